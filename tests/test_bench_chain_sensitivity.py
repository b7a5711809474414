"""bench/chain_sensitivity.py on a stub whose read-out is known: it reads the chain's pattern word and ignores its colour
word, so each number of the bench has a value computed by hand."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from moon_rl.data.catalogue import load_catalogue
from tests.helpers import import_bench

chain_sensitivity = import_bench("chain_sensitivity")

PATTERNS = ["checked", "dotted", "solid", "striped"]
COLOURS = ["red", "blue"]


@pytest.fixture()
def catalogue(tmp_path: Path):
    """Eight products: patterns p0-p3 = p4-p7, red p0-p3, blue p4-p7; one text query each, split `train`."""
    products, pairs = [], []
    for i in range(8):
        attributes = {"pattern": PATTERNS[i % 4], "colour": COLOURS[i // 4]}
        products.append({"id": f"p{i}", "title": "shirt", "attributes": attributes})
        pairs.append({"anchor": {"text": f"a {attributes['colour']} {attributes['pattern']} shirt"}, "positive": f"p{i}"})
    (tmp_path / "products.jsonl").write_text("".join(json.dumps(p) + "\n" for p in products))
    (tmp_path / "pairs_train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return load_catalogue(tmp_path)


class Tokenizer:
    """Each text becomes one token id, its index in `texts`."""

    def __init__(self):
        self.texts: list[str] = []

    def __call__(self, texts, add_special_tokens=False):
        self.texts += list(texts)
        return {"input_ids": [[len(self.texts) - len(texts) + i] for i in range(len(texts))]}


class StubEmbedder:
    """Read-out = [one-hot of the product's pattern | one-hot of its colour | one-hot of the pattern its chain names]:
    the photo gives both values, the chain's pattern word moves the embedding, its colour word does not. Greedy chains
    name the truth; of two sampled chains, the second names the other colour for even rows."""

    def __init__(self):
        self.processor = SimpleNamespace(tokenizer=Tokenizer())
        self.sampled_calls = 0

    @staticmethod
    def _truth(record) -> str:
        return f"<think>pattern {record.attributes['pattern']}. colour {record.attributes['colour']}.</think>"

    def encode(self, records, mode="reason", completions=None, return_completions=False, do_sample=False, **kwargs):
        assert mode == "reason"
        if completions is not None:
            chains = [self.processor.tokenizer.texts[ids[0]] for ids in completions]
        else:
            chains = [self._truth(r) for r in records]
            if do_sample:
                self.sampled_calls += 1
                if self.sampled_calls == 2:
                    chains = [c.replace("red", "blue") if i % 2 == 0 and "red" in c else
                              c.replace("blue", "red") if i % 2 == 0 else c for i, c in enumerate(chains)]
        vectors = []
        for record, chain in zip(records, chains, strict=True):
            said = next(p for p in PATTERNS if f"pattern {p}" in chain)
            vectors.append(np.concatenate([np.eye(4)[PATTERNS.index(record.attributes["pattern"])],
                                           np.eye(2)[COLOURS.index(record.attributes["colour"])],
                                           np.eye(4)[PATTERNS.index(said)]]))
        vectors = np.stack(vectors).astype(np.float32)
        return (vectors, chains) if return_completions else vectors


def test_each_number_is_the_hand_computed_cosine_of_a_read_out_that_reads_the_pattern_word_only(catalogue):
    result = chain_sensitivity.measure(StubEmbedder(), catalogue, "train", sampled=8, seed=0)
    # |e|^2 = 3. Only the pattern differs: the photo's and the chain's pattern parts differ, colour agrees: 1/3.
    # Only the colour differs: both pattern parts agree: 2/3.
    assert result["lookalike"]["pattern"] == (pytest.approx(1 / 3), 12)
    assert result["lookalike"]["colour"] == (pytest.approx(2 / 3), 4)
    # Rewriting the chain's pattern word moves one part of three: 2/3; its colour word moves nothing: 1.
    assert result["rewrite"]["pattern"] == (pytest.approx(2 / 3), 8)
    assert result["rewrite"]["colour"] == (pytest.approx(1.0), 8)
    sampled = result["sampled"]
    assert sampled["identical"] == pytest.approx(0.5)  # the even rows' second chain names the other colour
    assert sampled["differing"] == {"colour": (pytest.approx(1.0), 4)}
    assert sampled["mean"] == pytest.approx(1.0)
    every_pair = [(2 * (i % 4 == j % 4) + (i // 4 == j // 4)) / 3 for i in range(8) for j in range(i + 1, 8)]
    assert result["random"] == pytest.approx(np.mean(every_pair))
    lines = chain_sensitivity.table(result)
    assert "| colour | 0.667 (4) | 1.000 (8) | 1.000 (4) |" in lines
