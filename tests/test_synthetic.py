"""The builtin synthetic catalogue: determinism, the hard-gallery structure, the text-only ceiling, images."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moon_rl.data import SyntheticConfig, load_catalogue, synthesize, vocabulary_corpus
from moon_rl.data.synthetic import ATTRIBUTES, COLOURS, VOCABULARY, named_attributes, synthetic_cache_dir
from moon_rl.errors import DataError


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def synth200(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    # The structure and the text analysis do not depend on the image size; 32 px keeps this fast.
    out = tmp_path_factory.mktemp("synth") / "s200"
    return out, synthesize(out, SyntheticConfig(n_products=200, seed=0, image_size=32))


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path):
    options = SyntheticConfig(n_products=40, seed=7, image_size=48)
    synthesize(tmp_path / "a", options)
    synthesize(tmp_path / "b", options)
    a, b = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert a == b and len(a) == 5 + 2 * 40  # 4 data files + catalogue.json, 2 views per product
    synthesize(tmp_path / "c", SyntheticConfig(n_products=40, seed=8, image_size=48))
    c = _hashes(tmp_path / "c")
    assert set(c) == set(a)
    assert c["products.jsonl"] != a["products.jsonl"] and c["images/p0000_v0.png"] != a["images/p0000_v0.png"]
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind


def test_vocabulary_sizes_and_single_lowercase_words():
    sizes = {attr: len(values) for attr, values in VOCABULARY.items()}
    assert sizes["category"] >= 8 and sizes["colour"] >= 10 and sizes["pattern"] >= 5
    assert sizes["material"] >= 6 and sizes["brand"] >= 8
    words = [v for values in VOCABULARY.values() for v in values]
    assert all(re.fullmatch(r"[a-z]+", w) for w in words) and len(set(words)) == len(words)


def test_catalogue_structure_families_and_splits(synth200):
    out, report = synth200
    listed = {p["id"]: p for p in _jsonl(out / "products.jsonl")}
    products = {pid: p for pid, p in listed.items() if not pid.endswith("-dup")}
    manifest = json.loads((out / "catalogue.json").read_text())
    families = manifest["families"]
    assert len(products) == report.n_products == 200 and len(families) == report.n_families == 50
    assert all(set(p["attributes"]) == set(ATTRIBUTES) and p["category"] == p["attributes"]["category"]
               for p in products.values())  # fmt: skip
    assert len({tuple(p["attributes"].values()) for p in products.values()}) == 200  # unique attribute tuples
    for family in families:
        first = products[family[0]]["attributes"]
        for pid in family[1:]:
            diff = {k for k in ATTRIBUTES if products[pid]["attributes"][k] != first[k]}
            assert len(diff) == 1 and diff <= {"colour", "pattern"}
    test_ids = {pid for i in manifest["test_families"] for pid in families[i]}
    gallery = (out / "gallery_test.txt").read_text().split()
    assert set(gallery) == test_ids and len(gallery) == report.n_test_products == 40
    train, test = _jsonl(out / "pairs_train.jsonl"), _jsonl(out / "pairs_test.jsonl")
    # Test: a text query, another photo and another seller's listing (product->product) per product.
    duplicates = [p for p in test if isinstance(p["anchor"], str)]
    test = [p for p in test if not isinstance(p["anchor"], str)]
    assert len(train) == 2 * 160 and len(test) == 2 * 40 and len(duplicates) == 40
    assert len(listed) == 240 and manifest["counts"]["duplicate_listings"] == 40
    for pair in duplicates:
        dup, original = listed[pair["anchor"]], products[pair["positive"]]
        assert dup["attributes"] == original["attributes"] and dup["images"] == [f"images/{pair['positive']}_v1.png"]
        assert (dup["title"], dup["description"]) != (original["title"], original["description"])
        assert pair["anchor"] not in gallery
    trained = {p["positive"] for p in train} | {n for p in train for n in p["negatives"]}
    assert not trained & test_ids  # look-alikes in the hard gallery are never trained on
    for pid in gallery:  # every test product has >= 3 look-alikes (same text-visible attributes) in the gallery
        key = [products[pid]["attributes"][k] for k in ("category", "material", "brand")]
        assert sum(key == [products[g]["attributes"][k] for k in ("category", "material", "brand")]
                   for g in gallery) >= 4  # fmt: skip
    for pair in train:
        mine = products[pair["positive"]]["attributes"]
        assert pair["negatives"] and all(
            sum(products[n]["attributes"][k] != mine[k] for k in ATTRIBUTES) == 1 for n in pair["negatives"]
        )
    for pair in train + test:
        assert "text" in pair["anchor"] or pair["anchor"] == {"image": f"images/{pair['positive']}_v1.png"}
    assert all(p["images"] == [f"images/{pid}_v0.png"] for pid, p in products.items())
    assert all("negatives" not in p for p in test)


def test_texts_name_only_the_text_visible_attributes(synth200):
    out, _ = synth200
    products = _jsonl(out / "products.jsonl")
    colour_named = 0
    for p in products:
        named = named_attributes(f"{p['title']} {p['description']}")
        assert {"category", "material", "brand"} <= set(named) and "pattern" not in named
        assert all(p["attributes"][k] == v for k, v in named.items())
        colour_named += "colour" in named
        assert named_attributes(p["reasoning"]) == p["attributes"] and "<think>" not in p["reasoning"]
    assert 0.05 <= colour_named / len(products) <= 0.3
    assert len({p["title"].split()[0] for p in products}) > 5  # varied wording, not one template


def test_text_only_ceiling_and_unique_positives(synth200):
    out, report = synth200
    products = {p["id"]: p for p in _jsonl(out / "products.jsonl")}
    gallery = (out / "gallery_test.txt").read_text().split()
    queries = [p for p in _jsonl(out / "pairs_test.jsonl") if "text" in p["anchor"]]
    assert len(queries) == len(gallery)
    ceiling, ambiguous = 0.0, 0
    for pair in queries:
        wanted = named_attributes(pair["anchor"]["text"])
        assert wanted == products[pair["positive"]]["attributes"]  # the query names the full attribute set
        assert [g for g in gallery if products[g]["attributes"] == wanted] == [pair["positive"]]
        text_named = {g: named_attributes(f"{products[g]['title']} {products[g]['description']}") for g in gallery}
        consistent = [g for g in gallery if all(wanted[k] == v for k, v in text_named[g].items())]
        assert pair["positive"] in consistent
        ceiling += 1 / len(consistent)
        ambiguous += len(consistent) > 1
    analysis = json.loads((out / "catalogue.json").read_text())["text_only_analysis"]
    assert report.text_ceiling_r1 == analysis["text_ceiling_r1"] == pytest.approx(ceiling / len(queries), abs=1e-6)
    assert 0.2 <= report.text_ceiling_r1 <= 0.35
    assert (
        report.ambiguous_fraction == pytest.approx(ambiguous / len(queries), abs=1e-6)
        and ambiguous / len(queries) >= 0.5
    )
    assert report.chance_r1 == pytest.approx(1 / len(gallery), abs=1e-6)
    assert analysis["positive_unique"] is True
    assert "text-only ceiling: " in report.summary() and str(out) in report.summary()


def test_images_show_colour_and_views_differ(synth200):
    out, _ = synth200
    products = _jsonl(out / "products.jsonl")
    assert len({p["category"] for p in products}) >= 8
    for p in products[:40]:
        v0 = np.asarray(Image.open(out / "images" / f"{p['id']}_v0.png").convert("RGB"), dtype=np.int16)
        v1 = np.asarray(Image.open(out / "images" / f"{p['id']}_v1.png").convert("RGB"), dtype=np.int16)
        assert v0.shape == v1.shape == (32, 32, 3) and np.abs(v0 - v1).mean() > 5  # pose, scale, background differ
        if p["attributes"]["pattern"] == "solid":
            # Backgrounds are noisy and outlines darker, the fill is exact: of all catalogue colours, the product's
            # own covers the most pixels.
            counts = Counter(map(tuple, v0.reshape(-1, 3).tolist()))
            shares = {name: counts[rgb] / (32 * 32) for name, rgb in COLOURS.items()}
            assert max(shares, key=shares.get) == p["attributes"]["colour"] and max(shares.values()) >= 0.02


def test_vocabulary_corpus_covers_every_catalogue_word(synth200):
    out, _ = synth200
    start = time.perf_counter()
    corpus = vocabulary_corpus(seed=0, n=2000)
    assert time.perf_counter() - start < 1.0
    assert corpus == vocabulary_corpus(seed=0, n=2000) and corpus != vocabulary_corpus(seed=1, n=2000)
    corpus_words = set(re.findall(r"[A-Za-z]+", " ".join(corpus)))
    texts = [f"{p['title']} {p['description']} {p['reasoning']}" for p in _jsonl(out / "products.jsonl")]
    texts += [p["anchor"]["text"] for p in _jsonl(out / "pairs_train.jsonl") if "text" in p["anchor"]]
    assert set(re.findall(r"[A-Za-z]+", " ".join(texts))) <= corpus_words
    assert {v for values in VOCABULARY.values() for v in values} <= corpus_words


def test_builtin_synthetic_is_generated_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MOON_RL_CACHE", str(tmp_path / "cache"))
    options = SyntheticConfig(n_products=40, seed=1, image_size=32, lookalikes=3)
    catalogue = load_catalogue("builtin:synthetic", synthetic=options)
    folder = synthetic_cache_dir(options)
    assert folder.parent == tmp_path / "cache" / "synthetic" and (folder / "catalogue.json").is_file()
    stamp = (folder / "products.jsonl").stat().st_mtime_ns
    again = load_catalogue("builtin:synthetic", synthetic=options)
    assert (folder / "products.jsonl").stat().st_mtime_ns == stamp and again.products == catalogue.products
    n_test = len(catalogue.gallery("test"))  # each test product has a duplicate listing
    assert len(catalogue) == 40 + n_test and catalogue.splits == ["test", "train"]
    assert catalogue.gallery("test") == (folder / "gallery_test.txt").read_text().split()
    assert [p.id for p in catalogue.split_products("test")] == catalogue.gallery("test")
    image = catalogue.image(catalogue.products["p0000"])
    assert image.mode == "RGB" and image.size == (32, 32)
    with pytest.raises(DataError, match="no split 'dev'"):
        catalogue.gallery("dev")


def test_options_are_validated():
    with pytest.raises(DataError, match="test_fraction"):
        SyntheticConfig(test_fraction=1.5)
    with pytest.raises(DataError, match="lookalikes"):
        SyntheticConfig(lookalikes=99)
    with pytest.raises(DataError, match="trace_errors"):
        SyntheticConfig(trace_errors=1.5)
    with pytest.raises(DataError, match="trace_error_attributes"):
        SyntheticConfig(trace_errors=0.3, trace_error_attributes=("brand",))


def test_trace_errors_rewrite_only_the_chosen_training_traces(tmp_path: Path):
    clean = tmp_path / "clean"
    noisy = tmp_path / "noisy"
    synthesize(clean, SyntheticConfig(n_products=80, seed=3, image_size=32))
    synthesize(noisy, SyntheticConfig(n_products=80, seed=3, image_size=32, trace_errors=0.25,
                                   trace_error_attributes=("colour", "pattern")))
    a, b = _hashes(clean), _hashes(noisy)
    # Everything but the traces (and the manifest that lists the errors) is byte-identical: same test split, queries.
    assert {k for k in a if a[k] != b[k]} == {"products.jsonl", "catalogue.json"}
    test_ids = set((clean / "gallery_test.txt").read_text().split())
    clean_rows = {row["id"]: row for row in _jsonl(clean / "products.jsonl")}
    noisy_rows = {row["id"]: row for row in _jsonl(noisy / "products.jsonl")}
    errors = json.loads((noisy / "catalogue.json").read_text())["trace_errors"]
    train_ids = [i for i in clean_rows if i not in test_ids and "-dup" not in i]
    assert len(errors) == round(0.25 * len(train_ids)) and not set(errors) & test_ids
    assert {e["attribute"] for e in errors.values()} == {"colour", "pattern"}
    for pid, row in noisy_rows.items():
        assert {k: v for k, v in row.items() if k != "reasoning"} == {k: v for k, v in clean_rows[pid].items()
                                                                      if k != "reasoning"}
        named = named_attributes(row["reasoning"])
        if pid in errors:  # exactly the listed attribute is wrong, and named as listed
            attr = errors[pid]["attribute"]
            assert named[attr] == errors[pid]["trace"] != row["attributes"][attr] == errors[pid]["true"]
            assert {k: v for k, v in named.items() if k != attr} == {k: v for k, v in row["attributes"].items()
                                                                     if k != attr}
        else:
            assert row["reasoning"] == clean_rows[pid]["reasoning"] and named == row["attributes"]
    assert SyntheticConfig(trace_errors=0.25).key() != SyntheticConfig().key() == SyntheticConfig(trace_errors=0.0).key()


def test_validation_catalogue_holds_out_training_families_and_never_shows_the_test_split(tmp_path: Path):
    full, val = tmp_path / "full", tmp_path / "val"
    options = dict(n_products=80, seed=3, image_size=32, trace_errors=0.25)
    synthesize(full, SyntheticConfig(**options))
    report = synthesize(val, SyntheticConfig(**options, validation=True))
    assert "validation" in report.summary()
    test_ids = set((full / "gallery_test.txt").read_text().split())
    full_rows = {row["id"]: row for row in _jsonl(full / "products.jsonl")}
    val_rows = {row["id"]: row for row in _jsonl(val / "products.jsonl")}
    val_gallery = (val / "gallery_test.txt").read_text().split()
    # Nothing of the test families is left: no product, duplicate listing, pair or photo.
    shown = set(val_rows) | {p.name.split("_v")[0] for p in (val / "images").iterdir()}
    for split in ("train", "test"):
        for row in _jsonl(val / f"pairs_{split}.jsonl"):
            shown |= {row["positive"], *row.get("negatives", [])}
            shown |= {row["anchor"]} if isinstance(row["anchor"], str) else set()
    assert not {pid.removesuffix("-dup") for pid in shown} & test_ids
    # The held-out split: as many whole families as the test split, all of them training families of the full one.
    manifest = json.loads((val / "catalogue.json").read_text())
    held_out = [manifest["families"][index] for index in manifest["test_families"]]
    assert sorted(pid for family in held_out for pid in family) == sorted(val_gallery)
    assert len(val_gallery) == len(test_ids) and not set(val_gallery) & test_ids
    val_train = {row["positive"] for row in _jsonl(val / "pairs_train.jsonl")}
    assert val_train and not val_train & set(val_gallery)
    assert set(manifest["trace_errors"]) <= val_train  # the teacher's errors only where the model trains
    # Every kept product is the full catalogue's, photos included (its draws are seeded by its place in the full one).
    for pid in val_gallery + sorted(val_train):
        assert {k: v for k, v in val_rows[pid].items() if k != "reasoning"} == {
            k: v for k, v in full_rows[pid].items() if k != "reasoning"}
        assert (val / "images" / f"{pid}_v0.png").read_bytes() == (full / "images" / f"{pid}_v0.png").read_bytes()
    assert SyntheticConfig(**options, validation=True).key() != SyntheticConfig(**options).key()
    with pytest.raises(DataError, match="validation"):
        synthesize(tmp_path / "small", SyntheticConfig(n_products=80, test_fraction=0.4, validation=True))
