"""`validate_catalogue`: every problem is collected, with file, line, field, id and reason, and nothing else."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from moon_rl.data import Problem, SyntheticConfig, load_catalogue, synthesize, validate_catalogue
from moon_rl.errors import DataError


@pytest.fixture(scope="module")
def synth200(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 48 px: image size does not matter to validation and keeps the module fast.
    out = tmp_path_factory.mktemp("validate") / "synth"
    synthesize(out, SyntheticConfig(n_products=200, seed=3, image_size=48))
    return out


@pytest.fixture
def copy(synth200: Path, tmp_path: Path) -> Path:
    target = tmp_path / "catalogue"
    shutil.copytree(synth200, target)
    return target


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def test_synthesized_catalogue_validates_clean(synth200: Path):
    report = validate_catalogue(synth200)
    assert report.ok and report.problems == []
    # 200 products + 40 duplicate listings (the anchors of the product->product test pairs)
    assert report.n_products == 240 and report.n_pairs == {"test": 120, "train": 320}
    assert report.summary().endswith("240 products, pairs: test 120, train 320; OK")


def test_reports_exactly_the_three_planted_problems(copy: Path):
    (copy / "images" / "p0003_v0.png").unlink()
    lines = _lines(copy / "products.jsonl")
    assert json.loads(lines[9])["id"] == "p0009"
    lines[9] = lines[9].rstrip().rstrip("}") + "\n"  # malformed JSON; its id is still readable
    lines.append(lines[4])  # p0004 again, as line 241 (after 200 products and 40 duplicate listings)
    (copy / "products.jsonl").write_text("".join(lines), encoding="utf-8")

    report = validate_catalogue(copy)
    assert not report.ok and report.n_products == 239  # p0009 is out; the duplicate is not counted twice
    got = [(p.file, p.line, p.field, p.id) for p in report.problems]
    assert got == [
        ("products.jsonl", 4, "images[0]", "p0003"),
        ("products.jsonl", 10, None, "p0009"),
        ("products.jsonl", 241, "id", "p0004"),
    ]
    texts = [str(p) for p in report.problems]
    assert texts[0] == "products.jsonl:4: field 'images[0]': image file 'images/p0003_v0.png' not found (id p0003)"
    assert texts[1].startswith("products.jsonl:10: malformed JSON: ") and texts[1].endswith("(id p0009)")
    assert (
        texts[2] == "products.jsonl:241: field 'id': duplicate product id 'p0004' (first defined on line 5) (id p0004)"
    )
    assert report.summary().endswith("; 3 problems")
    # The loader stops at the first of them, with the same text.
    with pytest.raises(DataError, match=re.escape(texts[0])):
        load_catalogue(copy)


def test_unknown_ids_in_pairs_and_gallery_are_reported(copy: Path):
    with (copy / "pairs_train.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"anchor": "ghost", "positive": "p0000", "negatives": ["p0001", "nobody"]}) + "\n")
    with (copy / "gallery_test.txt").open("a", encoding="utf-8") as fh:
        fh.write("stranger\n")
    report = validate_catalogue(copy)
    n_train = report.n_pairs["train"]
    assert [str(p) for p in report.problems] == [
        f"gallery_test.txt:{report.n_pairs['test'] // 3 + 1}: unknown product id 'stranger' (id stranger)",
        f"pairs_train.jsonl:{n_train}: field 'anchor': unknown product id 'ghost'",
        f"pairs_train.jsonl:{n_train}: field 'negatives[1]': unknown product id 'nobody'",
    ]


def test_positive_missing_from_an_explicit_gallery_is_reported(copy: Path):
    gallery = _lines(copy / "gallery_test.txt")
    dropped = gallery.pop(0).strip()
    (copy / "gallery_test.txt").write_text("".join(gallery), encoding="utf-8")
    problems = validate_catalogue(copy).problems
    assert {(p.file, p.field) for p in problems} == {("pairs_test.jsonl", "positive")}
    assert len(problems) == 3 and all(f"positive {dropped!r} is not in gallery_test.txt" in p.reason for p in problems)


def _write(folder: Path, name: str, content: bytes | str) -> None:
    data = content.encode("utf-8") if isinstance(content, str) else content
    (folder / name).write_bytes(data)


def test_every_kind_of_row_problem_is_collected(tmp_path: Path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (10, 10), "red").save(tmp_path / "images" / "ok.png")
    _write(tmp_path / "images", "text.png", "hello")
    Image.new("RGB", (200, 200), "red").save(tmp_path / "images" / "huge.png")
    rows = [
        {"id": "a", "title": "fine", "images": ["images/ok.png"]},
        {"id": "b", "title": 7, "colour": "red"},
        {"id": "c"},
        {"id": "d", "title": "x", "images": ["images/text.png", "images/huge.png"]},
    ]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode() + b'{"id": "e", "title": "\xff"}\n[1, 2]\n'
    _write(tmp_path, "products.jsonl", body)
    _write(tmp_path, "pairs_train.jsonl", '{"anchor": {"image": "images/missing.png"}, "positive": "a"}\n'
                                          '{"anchor": {}, "positive": "a", "extra": 1}\n')  # fmt: skip
    report = validate_catalogue(tmp_path, max_pixels=100 * 100)
    got = [(p.file, p.line, p.field, p.id, p.reason) for p in report.problems]
    assert got == [
        ("products.jsonl", 2, "title", "b", "input should be a valid string, got int 7"),
        ("products.jsonl", 2, "colour", "b",
         "unknown field (known fields: id, title, description, category, attributes, images, reasoning)"),
        ("products.jsonl", 3, "title", "c", "required field is missing"),
        ("products.jsonl", 4, "images[0]", "d", "image file 'images/text.png' is not an image (unrecognised format)"),
        ("products.jsonl", 4, "images[1]", "d",
         "image file 'images/huge.png' is 200x200 = 40,000 pixels, over the limit of 10,000 "
         "(decompression-bomb guard; raise max_pixels only for images you trust)"),
        ("products.jsonl", 5, None, "e", "not valid UTF-8 (byte 0xff at column 23); save the file as UTF-8"),
        ("products.jsonl", 6, None, None, "expected a JSON object, got list"),
        ("pairs_train.jsonl", 1, "anchor.image", None, "image file 'images/missing.png' not found"),
        ("pairs_train.jsonl", 2, "anchor", None, "an inline query needs a non-empty `text` or `image` (or both)"),
        ("pairs_train.jsonl", 2, "extra", None, "unknown field (known fields: anchor, positive, positives, relevance, negatives)"),
    ]  # fmt: skip
    assert report.n_products == 2 and report.n_pairs == {"train": 1}


def test_empty_and_missing_catalogues(tmp_path: Path):
    _write(tmp_path, "products.jsonl", "")
    report = validate_catalogue(tmp_path)
    assert [str(p) for p in report.problems] == [
        "products.jsonl: catalogue has no products (the products file has no rows)"
    ]
    report = validate_catalogue(tmp_path / "nowhere")
    assert len(report.problems) == 1 and "does not exist" in report.problems[0].reason


def test_problem_text_without_line_field_or_id():
    assert (
        str(Problem("catalogue.json", None, None, None, "unreadable manifest")) == "catalogue.json: unreadable manifest"
    )


def test_several_positives_are_checked_like_one(tmp_path: Path):
    rows = [{"id": pid, "title": pid} for pid in "abc"]
    _write(tmp_path, "products.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    pairs = [
        {"anchor": {"text": "ok"}, "positives": ["a", "b"], "relevance": [3, 1]},
        {"anchor": {"text": "unknown"}, "positives": ["a", "zz"]},
        {"anchor": {"text": "both"}, "positive": "a", "positives": ["b"]},
        {"anchor": {"text": "grades"}, "positives": ["a", "b"], "relevance": [1]},
        {"anchor": {"text": "negative"}, "positives": ["a", "b"], "negatives": ["b"]},
        {"anchor": {"text": "not in gallery"}, "positives": ["a", "c"]},
        {"anchor": {"text": "zero"}, "positives": ["a"], "relevance": [0]},
    ]
    _write(tmp_path, "pairs_test.jsonl", "".join(json.dumps(r) + "\n" for r in pairs))
    _write(tmp_path, "gallery_test.txt", "a\nb\n")
    got = [(p.line, p.field, p.reason) for p in validate_catalogue(tmp_path).problems]
    assert got == [
        (2, "positives[1]", "unknown product id 'zz'"),
        (3, None, "a pair needs `positive` (one product id) or `positives` (a list of them), not both"),
        (4, None, "`relevance` needs one gain per positive (2), got 1"),
        (5, "negatives", "the positive 'b' is also listed as a negative"),
        (6, "positives", "positive 'c' is not in gallery_test.txt, so it cannot be retrieved"),
        (7, "relevance[0]", "input should be greater than 0, got int 0"),
    ]  # fmt: skip
