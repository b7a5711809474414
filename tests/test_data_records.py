"""Records (Product / Query / Pair) and sources (JSONL, CSV, parquet, HF dataset dirs, images)."""

from __future__ import annotations

import csv
import io
import json
import re
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from moon_rl.data import Pair, Product, Query, load_catalogue, load_image
from moon_rl.data.records import describe_errors
from moon_rl.errors import DataError, MoonError


def _png_bytes(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _errors(model: type, row: dict) -> list[tuple[str | None, str]]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(row)
    return describe_errors(info.value, model)


# ------------------------------------------------------------------------------------------------------- records


def test_product_rejects_unknown_keys_naming_them_and_the_known_fields():
    errors = _errors(Product, {"id": "p1", "title": "t", "colour": "red"})
    assert errors == [
        ("colour", "unknown field (known fields: id, title, description, category, attributes, images, reasoning)")
    ]


def test_product_wrong_types_name_the_field_and_the_value():
    errors = dict(_errors(Product, {"id": "", "title": 5, "attributes": {"colour": 1}, "images": ["a.png", 3]}))
    assert errors["id"].startswith("string should have at least 1 character")
    assert errors["title"] == "input should be a valid string, got int 5"
    assert errors["attributes.colour"] == "input should be a valid string, got int 1"
    assert errors["images[1]"] == "expected an image path (string) or image bytes, got int 3"
    assert _errors(Product, {"id": "p1"}) == [("title", "required field is missing")]


def test_product_defaults_and_bytes_images():
    product = Product.model_validate({"id": "p1", "title": "t", "images": ["a.png", b"\x89PNG"]})
    assert product.attributes == {} and product.description is None and product.reasoning is None
    assert product.images == ["a.png", b"\x89PNG"]


def test_pair_anchor_is_an_id_or_an_inline_query():
    assert Pair.model_validate({"anchor": "p1", "positive": "p2"}).anchor == "p1"
    pair = Pair.model_validate({"anchor": {"text": "red shirt"}, "positive": "p2", "negatives": ["p3"]})
    assert pair.anchor == Query(text="red shirt") and pair.negatives == ["p3"]
    assert _errors(Pair, {"anchor": {}, "positive": "p2"}) == [
        ("anchor", "an inline query needs a non-empty `text` or `image` (or both)")
    ]
    assert _errors(Pair, {"anchor": {"txt": "x"}, "positive": "p2"})[0] == (
        "anchor.txt",
        "unknown field (known fields: text, image)",
    )
    assert _errors(Pair, {"anchor": 7, "positive": "p2"})[0][1].startswith(
        "expected a product id (string) or an inline"
    )
    assert _errors(Pair, {"anchor": "p1", "positive": "p2", "negatives": [None]})[0][0] == "negatives[0]"


# ------------------------------------------------------------------------------------------------------- sources

PRODUCTS = [
    {"id": "p1", "title": "red shirt", "description": "cotton", "category": "shirt",
     "attributes": {"colour": "red", "material": "cotton"}, "images": ["images/p1.png"], "reasoning": "it is red"},
    {"id": "p2", "title": "blue mug", "description": None, "category": "mug", "attributes": {"colour": "blue"},
     "images": ["images/p2.png", "images/p2b.png"], "reasoning": None},
    {"id": "p3", "title": "plain lamp", "description": "a lamp, \"quoted\"", "category": None, "attributes": {},
     "images": [], "reasoning": None},
]  # fmt: skip
PAIRS = [
    {"anchor": "p1", "positive": "p2", "negatives": ["p3"]},
    {"anchor": {"text": "blue mug"}, "positive": "p2", "negatives": []},
    {"anchor": {"image": "images/p2b.png"}, "positive": "p2", "negatives": ["p1", "p3"]},
]


def _write_images(folder: Path) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name, colour in [("p1", (200, 0, 0)), ("p2", (0, 0, 200)), ("p2b", (0, 0, 150))]:
        (folder / "images" / f"{name}.png").write_bytes(_png_bytes(colour))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(rows[0])
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            cells = []
            for column in columns:
                value = row[column]
                cells.append("" if value is None else value if isinstance(value, str) else json.dumps(value))
            writer.writerow(cells)


def _tabular(rows: list[dict]) -> list[dict]:
    # Arrow cannot hold a column mixing strings and objects: mixed anchors are stored as JSON text.
    return [{**r, "anchor": r["anchor"] if isinstance(r["anchor"], str) else json.dumps(r["anchor"])}
            if "anchor" in r else r for r in rows]  # fmt: skip


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_tabular(rows)), path)


def _write_hf(path: Path, rows: list[dict]) -> None:
    import datasets

    datasets.Dataset.from_list(_tabular(rows)).save_to_disk(str(path))


WRITERS = {"jsonl": _write_jsonl, "csv": _write_csv, "parquet": _write_parquet, "hf": _write_hf}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_every_format_loads_to_the_same_records(tmp_path: Path, fmt: str):
    _write_images(tmp_path)
    suffix = "" if fmt == "hf" else f".{fmt}"
    WRITERS[fmt](tmp_path / f"products{suffix}", PRODUCTS)
    WRITERS[fmt](tmp_path / f"pairs_train{suffix}", PAIRS)
    catalogue = load_catalogue(tmp_path)
    assert list(catalogue.products.values()) == [Product.model_validate(r) for r in PRODUCTS]
    assert catalogue.pairs == {"train": [Pair.model_validate(r) for r in PAIRS]}
    assert catalogue.gallery("train") == ["p2"] and [p.id for p in catalogue.split_products("train")] == ["p2"]
    assert catalogue.image(catalogue.products["p2"], 1).getpixel((0, 0)) == (0, 0, 150)


def test_a_single_products_file_is_a_catalogue_without_pairs(tmp_path: Path):
    _write_images(tmp_path)
    _write_jsonl(tmp_path / "items.jsonl", PRODUCTS)
    catalogue = load_catalogue(tmp_path / "items.jsonl")
    assert list(catalogue.products) == ["p1", "p2", "p3"] and catalogue.pairs == {}


def test_csv_cells_may_be_plain_strings_for_list_columns(tmp_path: Path):
    _write_images(tmp_path)
    (tmp_path / "products.csv").write_text("id,title,images\np1,red shirt,images/p1.png\np2,mug,\n", encoding="utf-8")
    (tmp_path / "pairs_train.csv").write_text("anchor,positive,negatives\np1,p2,p1\n", encoding="utf-8")
    catalogue = load_catalogue(tmp_path)
    assert catalogue.products["p1"].images == ["images/p1.png"] and catalogue.products["p2"].images == []
    assert catalogue.pairs["train"][0].negatives == ["p1"]


def test_image_bytes_and_paths_decode_to_the_same_pixels(tmp_path: Path):
    import datasets

    _write_images(tmp_path)
    raw = (tmp_path / "images" / "p1.png").read_bytes()
    _write_parquet(tmp_path / "products.parquet", [{"id": "p1", "title": "t", "images": [raw]}])
    # An HF dataset with an `Image` feature stores {bytes, path}; the loader keeps the bytes without decoding.
    features = datasets.Features({"id": datasets.Value("string"), "title": datasets.Value("string"),
                                  "images": datasets.List(datasets.Image())})  # fmt: skip
    hf = datasets.Dataset.from_list([{"id": "p1", "title": "t", "images": [{"bytes": raw, "path": None}]}],
                                    features=features)  # fmt: skip
    hf.save_to_disk(str(tmp_path / "hf" / "products"))
    from_path = load_image("images/p1.png", tmp_path)
    for catalogue in (load_catalogue(tmp_path), load_catalogue(tmp_path / "hf")):
        product = catalogue.products["p1"]
        assert product.images == [raw]
        assert catalogue.image(product).tobytes() == from_path.tobytes()
    assert load_image(raw, tmp_path).size == (8, 6) and load_image(raw, tmp_path).mode == "RGB"
    import base64

    uri = "data:image/png;base64," + base64.b64encode(raw).decode()
    assert load_image(uri, tmp_path).tobytes() == from_path.tobytes()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR (with a correct CRC) claims another size: a decompression bomb's header."""
    data = bytearray(_png_bytes())
    ihdr = data[12:29]  # chunk type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def test_bomb_guard_reads_the_header_before_decoding(tmp_path: Path):
    (tmp_path / "bomb.png").write_bytes(_png_claiming(20000, 20000))
    with pytest.raises(DataError, match="image file 'bomb.png' is .*decompression-bomb"):
        load_image("bomb.png", tmp_path)
    (tmp_path / "big.png").write_bytes(_png_claiming(6000, 6000))  # under PIL's own limit, over ours
    with pytest.raises(DataError, match=re.escape("image file 'big.png' is 6000x6000 = 36,000,000 pixels, over the "
                                                  "limit of 1,000,000")):  # fmt: skip
        load_image("big.png", tmp_path, max_pixels=1_000_000)
    with pytest.raises(DataError, match="over the limit of 10"):
        load_image(_png_bytes(), tmp_path, max_pixels=10)


def test_non_images_truncated_and_missing_files_are_data_errors(tmp_path: Path):
    (tmp_path / "note.png").write_text("not an image at all", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape("image file 'note.png' is not an image (unrecognised format)")):
        load_image("note.png", tmp_path)
    big = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(big, format="PNG")
    (tmp_path / "cut.png").write_bytes(big.getvalue()[: len(big.getvalue()) // 2])
    with pytest.raises(DataError, match="image file 'cut.png' is truncated or corrupt"):
        load_image("cut.png", tmp_path)
    with pytest.raises(DataError, match=re.escape("image file 'gone.png' not found")):
        load_image("gone.png", tmp_path)
    assert issubclass(DataError, MoonError)


def test_rgba_images_are_composited_on_white(tmp_path: Path):
    buffer = io.BytesIO()
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(buffer, format="PNG")
    assert load_image(buffer.getvalue(), tmp_path).getpixel((0, 0)) == (255, 255, 255)


def test_loading_fails_fast_naming_file_line_field_and_reason(tmp_path: Path):
    _write_images(tmp_path)
    path = tmp_path / "products.jsonl"
    path.write_bytes(b'{"id": "p1", "title": "ok"}\n{"id": "p2", "title": "caf\xe9"}\n{"id": 3}\n')
    with pytest.raises(DataError, match=re.escape("products.jsonl:2: not valid UTF-8 (byte 0xe9 at column 27)")):
        load_catalogue(tmp_path)
    path.write_text('{"id": "p1", "title": "ok", "images": ["images/nope.png"]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(
            "products.jsonl:1: field 'images[0]': image file 'images/nope.png' not found (id p1)")):  # fmt: skip
        load_catalogue(tmp_path)
    path.write_text('{"id": "p1", "title": "ok"}\n', encoding="utf-8")
    _write_jsonl(tmp_path / "pairs_train.jsonl", [{"anchor": "p1", "positive": "p9"}])
    with pytest.raises(DataError, match=re.escape("pairs_train.jsonl:1: field 'positive': unknown product id 'p9'")):
        load_catalogue(tmp_path)


def test_non_utf8_csv_line_is_reported_with_its_line(tmp_path: Path):
    (tmp_path / "products.csv").write_bytes(b"id,title\np1,ok\np2,caf\xe9\n")
    with pytest.raises(DataError, match=re.escape("products.csv:3: not valid UTF-8")):
        load_catalogue(tmp_path)


def test_layout_errors_are_clear(tmp_path: Path):
    with pytest.raises(DataError, match="has no products file"):
        load_catalogue(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_catalogue(tmp_path / "missing")
    _write_jsonl(tmp_path / "products.jsonl", PRODUCTS[2:])
    _write_csv(tmp_path / "products.csv", PRODUCTS[2:])
    with pytest.raises(DataError, match="several products files"):
        load_catalogue(tmp_path)
    with pytest.raises(DataError, match="unknown builtin catalogue"):
        load_catalogue("builtin:nope")


def test_unreadable_pairs_file_is_not_skipped(tmp_path: Path):
    _write_jsonl(tmp_path / "products.jsonl", PRODUCTS[2:])
    (tmp_path / "pairs_train.json").write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape("cannot read 'pairs_train.json'")):
        load_catalogue(tmp_path)
    (tmp_path / "pairs_train.json").unlink()
    _write_jsonl(tmp_path / "pairs_train.jsonl", [])
    _write_csv(tmp_path / "pairs_train.csv", [{"anchor": "p3", "positive": "p3"}])
    with pytest.raises(DataError, match="split 'train' has several pair files"):
        load_catalogue(tmp_path)
