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
    """Each distinct text becomes one token id, its index in `texts` (equal texts, equal ids)."""

    def __init__(self):
        self.texts: list[str] = []

    def __call__(self, texts, add_special_tokens=False):
        for text in texts:
            if text not in self.texts:
                self.texts.append(text)
        return {"input_ids": [[self.texts.index(text)] for text in texts]}


class StubEmbedder:
    """Read-out = [one-hot of the product's pattern | one-hot of its colour | one-hot of the pattern its chain names]:
    the photo gives both values, the chain's pattern word moves the embedding, its colour word does not. Greedy chains
    name the truth; of two sampled chains, the second names the other colour for even rows."""

    swaps = True  # whether the second sampled chain of an even row names the other colour

    def __init__(self, tokenizer: Tokenizer | None = None):
        self.processor = SimpleNamespace(tokenizer=tokenizer or Tokenizer())
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
                if self.sampled_calls == 2 and self.swaps:
                    chains = [c.replace("red", "blue") if i % 2 == 0 and "red" in c else
                              c.replace("blue", "red") if i % 2 == 0 else c for i, c in enumerate(chains)]
        vectors = np.stack([self._read(record, chain) for record, chain in zip(records, chains, strict=True)])
        vectors = vectors.astype(np.float32)
        if return_completions == "ids":
            return vectors, self.processor.tokenizer(chains)["input_ids"]
        return (vectors, chains) if return_completions else vectors

    @staticmethod
    def _read(record, chain: str) -> np.ndarray:
        said = next(p for p in PATTERNS if f"pattern {p}" in chain)
        return np.concatenate([np.eye(4)[PATTERNS.index(record.attributes["pattern"])],
                               np.eye(2)[COLOURS.index(record.attributes["colour"])], np.eye(4)[PATTERNS.index(said)]])


class ColourReader(StubEmbedder):
    """The stub's read-out plus a one-hot of the colour its chain names: the chain's colour word moves it too. It
    samples the same chain twice."""

    swaps = False

    @staticmethod
    def _read(record, chain: str) -> np.ndarray:
        said = next(c for c in COLOURS if f"colour {c}" in chain)
        return np.concatenate([StubEmbedder._read(record, chain), np.eye(2)[COLOURS.index(said)]])


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


def test_cross_read_pairs_each_samplers_chains_with_each_reader(catalogue):
    tokenizer = Tokenizer()  # shared, as fine-tunes of one base share theirs
    found = chain_sensitivity.cross_read({"pattern": StubEmbedder(tokenizer), "colour": ColourReader(tokenizer)},
                                         catalogue, "train", sampled=8, seed=0)
    assert set(found) == {("pattern", "pattern"), ("pattern", "colour"), ("colour", "pattern"), ("colour", "colour")}
    # The pattern stub's second chain names the other colour for the even rows; the pattern reader ignores the colour
    # word (the differing pairs embed alike), the colour reader does not: |e|^2 = 4 and one part of four differs,
    # 3/4 over the differing pairs, (4 + 4 * 3/4) / 8 over all.
    assert found["pattern", "pattern"] == {"identical": pytest.approx(0.5), "mean": pytest.approx(1.0),
                                           "differing": pytest.approx(1.0)}
    assert found["pattern", "colour"] == {"identical": pytest.approx(0.5), "mean": pytest.approx(0.875),
                                          "differing": pytest.approx(0.75)}
    for reader in ("pattern", "colour"):  # the colour stub samples the same chain twice, whoever reads them
        assert found["colour", reader]["identical"] == 1.0 and found["colour", reader]["mean"] == pytest.approx(1.0)
        assert np.isnan(found["colour", reader]["differing"])
    lines = chain_sensitivity.cross_table(found)
    assert lines[0] == "| chains sampled by | identical pairs | read out by pattern | read out by colour |"
    assert "| pattern | 0.500 | 1.000 (1.000) | 0.875 (0.750) |" in lines
