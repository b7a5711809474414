"""The synthetic catalogue's words: filler words, the title / description / query templates and their rendering.

moon_rl/data/synthetic.py decides what each product is and calls these with its random stream; the order of the
draws here is part of the catalogue's byte-identical output (change it and bump `GENERATOR_VERSION` there).
"""

from __future__ import annotations

import random

__all__ = ["ADJECTIVES", "SEASONS", "TEMPLATES", "USES", "description", "fill", "query", "title"]

# Filler words; none may be an attribute value (the text-only analysis reads attribute values off the words).
ADJECTIVES = ("classic", "modern", "everyday", "lightweight", "durable", "elegant", "simple", "versatile", "sturdy")
USES = ("work", "weekends", "travel", "evenings", "home", "the office", "outdoor days")
SEASONS = ("spring", "summer", "autumn", "winter")

# Templates. Attribute values always appear lowercase and as whole words, so each can be a single token.
TITLES = (
    "{brand} {material} {category}",
    "{material} {category} by {brand}",
    "{brand} {category} in {material}",
    "{category} from {brand}, {material}",
    "{brand} | {material} {category}",
)
DESC_OPEN = (
    "A {adj} {category} made of {material}.",
    "This {adj} {category} is crafted from {material}.",
    "Our {adj} {category}: {material} through and through.",
    "Made from {material}, this {category} is {adj} and {adj2}.",
)
DESC_BRAND = (
    "Designed by {brand}.",
    "From the {brand} {season} collection.",
    "Quality by {brand}, built for {use}.",
    "Sold exclusively by {brand}.",
)
DESC_EXTRA = ("Ideal for {use}.", "A {adj} choice for {use}.", "Easy to care for.", "")
DESC_COLOUR = ("Shown here in {colour}.", "The colour is {colour}.", "Finished in {colour}.")
QUERIES = (
    "{colour} {pattern} {material} {category} by {brand}",
    "{brand} {category}, {colour} {pattern}, {material}",
    "looking for a {pattern} {colour} {category} in {material} from {brand}",
    "{material} {category} from {brand} with a {pattern} {colour} look",
    "{colour} {category}, {pattern}, made of {material}, brand {brand}",
    "need a {brand} {material} {category} that is {colour} and {pattern}",
)
#: Every template, for the tokenizer corpus (`vocabulary_corpus`).
TEMPLATES = (*TITLES, *DESC_OPEN, *DESC_BRAND, *DESC_EXTRA, *DESC_COLOUR, *QUERIES)


def fill(rng: random.Random, attrs: dict[str, str]) -> dict[str, str]:
    """`attrs` plus the filler words a template may use (adjectives, a use, a season), drawn from `rng`."""
    adj, adj2 = rng.sample(ADJECTIVES, 2)
    return {**attrs, "adj": adj, "adj2": adj2, "use": rng.choice(USES), "season": rng.choice(SEASONS)}


def title(rng: random.Random, attrs: dict[str, str], with_colour: bool) -> str:
    """A product title naming category, material and brand (and the colour, `with_colour`)."""
    values = dict(attrs)
    if with_colour:
        values["category"] = f"{attrs['colour']} {attrs['category']}"
    return rng.choice(TITLES).format(**values)


def description(rng: random.Random, attrs: dict[str, str], with_colour: bool) -> str:
    """A product description: an opener, then brand, extra and (`with_colour`) colour sentences in varied order."""
    values = fill(rng, attrs)
    rest = [rng.choice(DESC_BRAND), rng.choice(DESC_EXTRA)] + ([rng.choice(DESC_COLOUR)] if with_colour else [])
    rng.shuffle(rest)  # the opener stays first; the other sentences come in varied order
    return " ".join(p.format(**values) for p in [rng.choice(DESC_OPEN), *rest] if p)


def query(rng: random.Random, attrs: dict[str, str]) -> str:
    """A shopper's text query naming every attribute."""
    return rng.choice(QUERIES).format(**attrs)
