"""bench/reward_judge.py's judge on a stub embedder whose read-out is known: does it credit the reward only when the
true-value chain wins, and report the policy's own accuracy from its chains?"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moon_rl.data.catalogue import load_catalogue
from moon_rl.data.records import Product, Query
from tests.helpers import import_bench

reward_judge = import_bench("reward_judge")

PATTERNS = ["checked", "dotted", "solid", "striped"]


@pytest.fixture()
def catalogue(tmp_path: Path):
    """Eight products, one text query ("a <pattern> shirt") and one image query each, all in split `train`."""
    products, pairs = [], []
    (tmp_path / "images").mkdir()
    for i in range(8):
        Image.new("RGB", (32, 32), "white").save(tmp_path / "images" / f"p{i}.png")
        pattern = PATTERNS[i % 4]
        products.append({"id": f"p{i}", "title": "shirt", "attributes": {"pattern": pattern}})
        pairs.append({"anchor": {"text": f"a {pattern} shirt"}, "positive": f"p{i}"})
        pairs.append({"anchor": {"image": f"images/p{i}.png"}, "positive": f"p{i}"})
    (tmp_path / "products.jsonl").write_text("".join(json.dumps(p) + "\n" for p in products))
    (tmp_path / "pairs_train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return load_catalogue(tmp_path)


class StubEmbedder:
    """Read-out = one-hot of the pattern its chain names (`reads_chain`), else of nothing; text queries = one-hot of the
    pattern they name; image queries = zeros. Greedy chains name the truth for products p0-p3, `wrong` for p4-p7."""

    def __init__(self, catalogue, reads_chain: bool = True, wrong: str = "dotted"):
        self.catalogue, self.reads_chain, self.wrong = catalogue, reads_chain, wrong
        self.tokens: list[str] = []

    def _onehot(self, text: str) -> np.ndarray:
        vector = np.zeros(len(PATTERNS) + 1, dtype=np.float32)
        named = [i for i, p in enumerate(PATTERNS) if p in text]
        vector[named[0] if named else len(PATTERNS)] = 1.0
        return vector

    def tokenize_reasoning(self, traces):
        self.tokens += list(traces)
        return [[len(self.tokens) - len(traces) + i] for i in range(len(traces))]

    def encode(self, records, mode="direct", load_image=None, return_completions=False, completions=None, **kwargs):
        if mode == "direct":
            return np.stack([self._onehot(r.text) if r.text else np.zeros(len(PATTERNS) + 1, np.float32)
                             for r in records])
        if completions is not None:
            chains = [self.tokens[ids[0]] for ids in completions]
        else:
            chains = [f"<think>pattern {r.attributes['pattern'] if int(r.id[1:]) < 4 else self.wrong}.</think>"
                      for r in records]
        vectors = np.stack([self._onehot(c) if self.reads_chain else self._onehot("") for c in chains])
        return (vectors, chains) if return_completions else vectors


def test_a_read_out_that_reads_the_chain_is_a_perfect_text_judge_and_the_policy_is_scored_on_its_own_chains(catalogue):
    assert all(isinstance(p, Product) for p in catalogue.products.values())
    assert any(isinstance(pair.anchor, Query) for pair in catalogue.pairs["train"])
    result = reward_judge.judge(StubEmbedder(catalogue), catalogue, "train", ["pattern"], max_products=8)["pattern"]
    assert result["products"] == 8 and result["values"] == 4
    # p4-p7 say "dotted": right only for p5 (dotted), so 4 + 1 of 8.
    assert result["greedy"] == pytest.approx(5 / 8)
    assert result["cos/text"] == 1.0 and result["logprob/text"] == 1.0
    # Image queries embed as zeros: every variant ties on the cosine, and a tie is no preference for the truth.
    assert result["cos/image"] == 0.0
    # The log-probability also counts the negatives: the true value's rewrite matches the text query of one other
    # product (its own is masked out), any other value's rewrite two, so the truth wins on the denominator alone.
    # Were the product's own text query not masked, the truth would match two as well and tie (0.0).
    assert result["logprob/image"] == 1.0


def test_a_read_out_that_ignores_the_chain_never_prefers_the_truth(catalogue):
    result = reward_judge.judge(StubEmbedder(catalogue, reads_chain=False), catalogue, "train", ["pattern"], 8)
    assert result["pattern"]["greedy"] == pytest.approx(5 / 8)
    assert result["pattern"]["cos/text"] == 0.0 and result["pattern"]["logprob/text"] == 0.0


def test_max_products_and_chains_that_name_no_value_are_left_out(catalogue):
    result = reward_judge.judge(StubEmbedder(catalogue, wrong="plain"), catalogue, "train", ["pattern"], 6)
    assert result["pattern"]["products"] == 4  # p0-p5 taken; p4 and p5 name no pattern
    assert result["pattern"]["greedy"] == 1.0
