"""The chat prompts moon-rl builds for products and queries, shared by training, embedding and evaluation.

One place defines the wording, so the builtin tokenizer (trained on these strings) and every stage agree.
"""

from __future__ import annotations

#: Instruction for a catalogue product (image(s) + text): reason about its attributes, then embed it.
PRODUCT_INSTRUCTION = "Analyse the product attributes: colour, pattern, category, material and brand."
#: Instruction for a search query (text and/or image) embedded into the same space as products.
QUERY_INSTRUCTION = "Find the product for this search query."
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def format_reasoning(trace: str) -> str:
    """Wrap a reasoning trace in think tags, as the model is trained to write it."""
    return f"{THINK_OPEN}{trace.strip()}{THINK_CLOSE}"


def instruction_texts() -> list[str]:
    """Every fixed string the prompts contain (for tokenizer training)."""
    return [PRODUCT_INSTRUCTION, QUERY_INSTRUCTION, "Title:", "Description:", "Query:"]
