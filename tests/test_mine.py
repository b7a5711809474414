"""`moon-rl mine`: nearest non-positive products become negatives; each false-negative filter removes what it should."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moon_rl.data.catalogue import load_catalogue
from moon_rl.data.records import Product
from moon_rl.errors import DataError
from moon_rl.inference.mine import mine_negatives, write_mined_catalogue


def _unit(angle_deg: float) -> np.ndarray:
    """A 2-d unit vector: the cosine of two of them is the cosine of their angle difference."""
    a = np.deg2rad(angle_deg)
    return np.array([np.cos(a), np.sin(a)], dtype=np.float32)


class PlantedEmbedder:
    """Vectors by product id or query text, so that every score is planted."""

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors, self.calls = vectors, []

    def encode(self, records, mode="direct", batch_size=32, *, load_image=None, show_progress=False):
        self.calls.append(mode)
        keys = [r.id if isinstance(r, Product) else r.text for r in records]
        return np.stack([self.vectors[key] for key in keys])


@pytest.fixture
def catalogue(tmp_path: Path):
    folder = tmp_path / "cat"
    folder.mkdir()
    products = [{"id": pid, "title": title} for pid, title in [
        ("pos", "Red Shirt"), ("pos2", "blue shirt"), ("dup", "red  shirt"), ("close", "near twin"),
        ("n1", "one"), ("n2", "two"), ("n3", "three"), ("n4", "four"), ("anchor", "the anchor product")]]
    (folder / "products.jsonl").write_text("".join(json.dumps(p) + "\n" for p in products))
    pairs = [{"anchor": {"text": "red shirt"}, "positive": "pos", "negatives": ["n4"]},
             {"anchor": {"text": "red shirt"}, "positive": "pos2"},  # a second right answer to the same query
             {"anchor": "anchor", "positive": "pos"}]
    (folder / "pairs_train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return load_catalogue(folder)


# Angles from the query (0 degrees): cos(pos) = 1, pos2 and dup at 5 (0.996), close at 10 (0.985 > 0.95 x 1),
# then n1 25 (0.906), n2 30, n3 35, n4 40. The product anchor sits at 0 too: its positive scores 1.
PLANTED = {"red shirt": _unit(0), "pos": _unit(0), "pos2": _unit(5), "dup": _unit(5), "close": _unit(10),
           "n1": _unit(25), "n2": _unit(30), "n3": _unit(35), "n4": _unit(40), "anchor": _unit(0)}


def test_filters_remove_the_positives_duplicates_and_near_twins_and_count_them(catalogue):
    report = mine_negatives(PlantedEmbedder(PLANTED), catalogue, "train", k=2, margin=0.95, show_progress=False)
    assert report.mined == [["n1", "n2"], ["n1", "n2"], ["n1", "n2"]]
    # pair 1 (ceiling 0.95): positives pos, pos2 (the same query's); duplicate dup (pos's title); too close: the
    # anchor product (1.0) and close (0.985). pair 2 (ceiling 0.95 x cos(pos2) = 0.946): the same five.
    # pair 3: its anchor; positive pos; too close pos2 (not this anchor's positive) and close; duplicate dup.
    assert report.counts()["removed"] == {"anchor": 1, "positive": 5, "duplicate": 3, "too_close": 6}
    assert report.short == 0


def test_without_the_margin_a_near_twin_is_a_negative_and_k_beyond_the_catalogue_is_short(catalogue):
    report = mine_negatives(PlantedEmbedder(PLANTED), catalogue, "train", k=2, margin=None, show_progress=False)
    assert report.mined[0] == ["anchor", "close"]  # another product, however close, is a negative now
    many = mine_negatives(PlantedEmbedder(PLANTED), catalogue, "train", k=20, margin=None, show_progress=False)
    assert many.short == 3 and many.mined[0] == ["anchor", "close", "n1", "n2", "n3", "n4"]


def test_mined_copy_replaces_or_keeps_the_given_negatives_and_sft_reads_them(catalogue, tmp_path):
    report = mine_negatives(PlantedEmbedder(PLANTED), catalogue, "train", k=2, show_progress=False)
    out = write_mined_catalogue(catalogue, report, tmp_path / "mined", model="m")
    copy = load_catalogue(out)
    assert [p.negatives for p in copy.pairs["train"]] == [["n1", "n2"]] * 3
    assert copy.manifest["mining"]["removed"]["too_close"] == 6 and copy.manifest["mining"]["model"] == "m"
    kept = load_catalogue(write_mined_catalogue(catalogue, report, tmp_path / "kept", keep_given=True))
    assert kept.pairs["train"][0].negatives == ["n4", "n1", "n2"]
    assert [p.anchor for p in kept.pairs["train"]] == [p.anchor for p in catalogue.pairs["train"]]
    with pytest.raises(DataError, match="^mine: .* already exists"):
        write_mined_catalogue(catalogue, report, tmp_path / "mined")

    from moon_rl.training.sft_data import sft_examples

    examples = sft_examples(copy, "train", None)
    assert [list(ex.negatives) for ex in examples][:1] == [["n1", "n2"]]


def test_products_are_embedded_in_the_asked_mode_and_anchors_in_direct_mode(catalogue):
    embedder = PlantedEmbedder(PLANTED)
    mine_negatives(embedder, catalogue, "train", k=1, mode="reason", show_progress=False)
    assert embedder.calls == ["reason", "direct"]


def test_a_missing_split_or_unknown_id_is_a_clear_error(catalogue):
    with pytest.raises(DataError, match="no pairs for split 'test'"):
        mine_negatives(PlantedEmbedder(PLANTED), catalogue, "test", show_progress=False)
    catalogue.pairs["train"].append(catalogue.pairs["train"][0].model_copy(update={"positive": "ghost"}))
    with pytest.raises(DataError, match="pair 3: unknown product id 'ghost'"):
        mine_negatives(PlantedEmbedder(PLANTED), catalogue, "train", show_progress=False)



def test_products_of_other_splits_only_are_never_candidates(catalogue):
    catalogue.pairs["test"] = [catalogue.pairs["train"][0].model_copy(update={"positive": "n1", "negatives": []})]
    catalogue.galleries["test"] = ["n1", "n2"]
    report = mine_negatives(PlantedEmbedder(PLANTED), catalogue, "train", k=2, show_progress=False)
    assert report.mined[0] == ["n3", "n4"] and report.held_out == 2
    # n4 is a given negative of a training pair: the training split uses it, so it is no held-out product
    catalogue.galleries["test"].append("n4")
    assert mine_negatives(PlantedEmbedder(PLANTED), catalogue, "train", k=2, show_progress=False).mined[0] == ["n3", "n4"]


def test_a_look_alike_with_the_same_title_is_not_a_duplicate_listing():
    from moon_rl.inference.mine import _listing_keys

    shirt = Product(id="a", title="Acme shirt", attributes={"colour": "red"}, images=["a.png"])
    other_seller = Product(id="b", title="acme  SHIRT", attributes={"colour": "Red"}, images=["b.png"])
    look_alike = Product(id="c", title="Acme shirt", attributes={"colour": "blue"}, images=["c.png"])
    same_photo = Product(id="d", title="something else", images=["a.png"])
    assert _listing_keys(shirt) & _listing_keys(other_seller)
    assert not _listing_keys(shirt) & _listing_keys(look_alike)
    assert _listing_keys(shirt) & _listing_keys(same_photo)


def test_a_pair_with_several_positives_mines_past_all_of_them_and_keeps_them_in_the_copy(catalogue, tmp_path):
    folder = tmp_path / "multi"
    folder.mkdir()
    (folder / "products.jsonl").write_text((catalogue.base_dir / "products.jsonl").read_text())
    pairs = [{"anchor": {"text": "red shirt"}, "positives": ["pos", "pos2"], "relevance": [2, 1], "negatives": ["n4"]}]
    (folder / "pairs_train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    multi = load_catalogue(folder)
    report = mine_negatives(PlantedEmbedder(PLANTED), multi, "train", k=2, margin=0.95, show_progress=False)
    # Both positives skipped; the ceiling is the less similar positive's (0.95 x cos 5 = 0.946): "anchor" (1.0) and
    # "close" (0.985) are too close; "dup" lists like "pos".
    assert report.mined == [["n1", "n2"]]
    assert report.counts()["removed"] == {"anchor": 0, "positive": 2, "duplicate": 1, "too_close": 2}
    copy = load_catalogue(write_mined_catalogue(multi, report, tmp_path / "mined", model="m"))
    pair = copy.pairs["train"][0]
    assert (pair.positives, pair.relevance, pair.negatives) == (["pos", "pos2"], [2.0, 1.0], ["n1", "n2"])
