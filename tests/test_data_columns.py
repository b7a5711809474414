"""`data.columns` and `data.splits`: tables with other column names, `datasets` folders and Hub datasets load into the
same catalogue as the canonical files, without conversion."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from moon_rl.data import load_catalogue, load_image, validate_catalogue
from moon_rl.data.columns import ColumnMap
from moon_rl.data.hub import HubRef, parse_hub_ref
from moon_rl.data.sources import table_rows
from moon_rl.errors import DataError
from tests.helpers import TINY_SFT, tiny_recipe

COLUMNS = {"id": "sku", "title": "name", "description": "desc", "category": "cat", "attributes": "attrs",
           "image": "img", "reasoning": "trace", "query_text": "query", "query_image": "query_img",
           "positive": "item", "negatives": "hard_negs"}  # fmt: skip
PRODUCTS = [
    {"id": "p1", "title": "red shirt", "description": "cotton", "category": "shirt", "attributes": {"colour": "red"},
     "images": ["images/p1.png"], "reasoning": "it is red"},
    {"id": "p2", "title": "blue mug", "category": "mug", "attributes": {"colour": "blue"}, "images": ["images/p2.png"]},
    {"id": "p3", "title": "plain lamp"},
]  # fmt: skip
PAIRS = {
    "train": [{"anchor": {"text": "red shirt"}, "positive": "p1", "negatives": ["p2"]},
              {"anchor": {"text": "mug", "image": "images/q2.png"}, "positive": "p2"},
              {"anchor": {"image": "images/q2.png"}, "positive": "p2"}],
    "test": [{"anchor": {"text": "lamp"}, "positive": "p3"}],
}  # fmt: skip


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _images(folder: Path) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name, colour in [("p1", (200, 0, 0)), ("p2", (0, 0, 200)), ("q2", (0, 0, 150))]:
        (folder / "images" / f"{name}.png").write_bytes(_png(colour))


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _canonical(folder: Path):
    _images(folder)
    _jsonl(folder / "products.jsonl", PRODUCTS)
    for split, rows in PAIRS.items():
        _jsonl(folder / f"pairs_{split}.jsonl", rows)
    return load_catalogue(folder)


def _renamed_product(row: dict) -> dict:
    return {"sku": row["id"], "name": row["title"], "desc": row.get("description"), "cat": row.get("category"),
            "attrs": row.get("attributes") or None, "img": (row.get("images") or [None])[0],
            "trace": row.get("reasoning"), "price": 9.5}  # fmt: skip


def _renamed_pair(row: dict) -> dict:
    return {"query": row["anchor"].get("text"), "query_img": row["anchor"].get("image"), "item": row["positive"],
            "hard_negs": row.get("negatives", []), "clicks": 3}  # fmt: skip


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(list(rows[0]))
        for row in rows:
            writer.writerow(["" if v is None else v if isinstance(v, str) else json.dumps(v) for v in row.values()])


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def _write_hf(path: Path, rows: list[dict]) -> None:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))


WRITERS = {"jsonl": (_jsonl, ".jsonl"), "csv": (_write_csv, ".csv"), "parquet": (_write_parquet, ".parquet"),
           "hf": (_write_hf, "")}  # fmt: skip


def _renamed_folder(folder: Path, fmt: str) -> Path:
    write, suffix = WRITERS[fmt]
    _images(folder)
    write(folder / f"products{suffix}", [_renamed_product(r) for r in PRODUCTS])
    for split, rows in PAIRS.items():
        write(folder / f"pairs_{split}{suffix}", [_renamed_pair(r) for r in rows])
    return folder


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_renamed_columns_load_into_the_canonical_catalogue(tmp_path: Path, fmt: str):
    expected = _canonical(tmp_path / "canonical")
    catalogue = load_catalogue(_renamed_folder(tmp_path / fmt, fmt), columns=COLUMNS)
    assert catalogue.products == expected.products  # `price` and `clicks` are not mapped: ignored
    assert catalogue.pairs == expected.pairs
    assert validate_catalogue(tmp_path / fmt, columns=COLUMNS).ok


def test_without_columns_a_renamed_table_is_still_an_error(tmp_path: Path):
    _renamed_folder(tmp_path, "jsonl")
    with pytest.raises(DataError, match=re.escape("products.jsonl:1: field 'id': required field is missing")):
        load_catalogue(tmp_path)


def _flat_rows(split: str) -> list[dict]:
    """A query-product dataset: one row per query, the product's columns repeated in each."""
    products = {p["id"]: p for p in PRODUCTS}
    rows = [{**_renamed_product(products[pair["positive"]]), "query": pair["anchor"].get("text"),
             "query_img": pair["anchor"].get("image")} for pair in PAIRS[split]]  # fmt: skip
    if split == "train":  # a product nobody searched for yet: listed, no pair
        rows.append({**_renamed_product(products["p3"]), "query": None, "query_img": None})
    return rows


FLAT_COLUMNS = {k: v for k, v in COLUMNS.items() if k not in ("positive", "negatives")}


def _expected_flat_pairs(split: str) -> list:
    from moon_rl.data import Pair

    return [Pair.model_validate({**pair, "negatives": []}) for pair in PAIRS[split]]


def test_a_saved_dataset_dict_with_query_rows_is_a_catalogue(tmp_path: Path):
    import datasets

    expected = _canonical(tmp_path / "canonical")
    folder = tmp_path / "saved"
    _images(folder)
    datasets.DatasetDict({"training": datasets.Dataset.from_list(_flat_rows("train")),
                          "validation": datasets.Dataset.from_list(_flat_rows("test")),
                          "test": datasets.Dataset.from_list(_flat_rows("train")[:1])}).save_to_disk(str(folder))
    catalogue = load_catalogue(folder, columns=FLAT_COLUMNS, splits={"train": "training", "test": "validation"})
    # Each product once (p1 and p2 repeat per query), in order of first appearance; the dataset's own `test` split is
    # not read: data.splits lists the splits to read.
    assert catalogue.products == {pid: expected.products[pid] for pid in ("p1", "p2", "p3")}
    assert catalogue.pairs == {"train": _expected_flat_pairs("train"), "test": _expected_flat_pairs("test")}
    everything = load_catalogue(folder, columns=FLAT_COLUMNS)
    assert sorted(everything.pairs) == ["test", "training", "validation"]
    assert everything.pairs["test"] == _expected_flat_pairs("train")[:1]


def test_a_folder_of_hub_style_parquet_files_is_read_through_datasets(tmp_path: Path):
    expected = _canonical(tmp_path / "canonical")
    folder = tmp_path / "download"
    _images(folder)
    (folder / "data").mkdir()
    for split in ("train", "test"):
        _write_parquet(folder / "data" / f"{split}-00000-of-00001.parquet", _flat_rows(split))
    catalogue = load_catalogue(folder, columns=FLAT_COLUMNS)
    assert catalogue.products == {pid: expected.products[pid] for pid in ("p1", "p2", "p3")}
    assert catalogue.pairs == {"train": _expected_flat_pairs("train"), "test": _expected_flat_pairs("test")}


def test_a_products_split_holds_the_products_and_the_others_pairs(tmp_path: Path):
    import datasets

    expected = _canonical(tmp_path / "canonical")
    folder = tmp_path / "saved"
    _images(folder)
    datasets.DatasetDict({
        "corpus": datasets.Dataset.from_list([_renamed_product(r) for r in PRODUCTS]),
        **{split: datasets.Dataset.from_list([_renamed_pair(r) for r in rows]) for split, rows in PAIRS.items()},
    }).save_to_disk(str(folder))
    catalogue = load_catalogue(folder, columns=COLUMNS, splits={"products": "corpus", "train": "train", "test": "test"})
    assert catalogue.products == expected.products and catalogue.pairs == expected.pairs


def test_images_as_bytes_paths_hf_cells_and_pil_decode_to_the_same_pixels(tmp_path: Path):
    import datasets

    _images(tmp_path)
    raw = (tmp_path / "images" / "p1.png").read_bytes()
    pil = Image.open(io.BytesIO(raw))
    cells = {"bytes": raw, "path": "images/p1.png", "absolute": str(tmp_path / "images" / "p1.png"),
             "hf-bytes": {"bytes": raw, "path": "p1.png"}, "hf-path": {"bytes": None, "path": "images/p1.png"},
             "pil": pil}  # fmt: skip
    rows = [{"sku": name, "name": "t", "img": cell} for name, cell in cells.items()]
    loaded = list(table_rows(["sku", "name", "img"], rows, ColumnMap({"id": "sku", "title": "name", "image": "img"})))
    assert [row.errors for row in loaded] == [[]] * len(cells)
    want = load_image("images/p1.png", tmp_path).tobytes()
    for row in loaded:
        assert load_image(row.data["images"][0], tmp_path).tobytes() == want, row.data["id"]
    # A saved dataset's `Image` column, filled from PIL images, from files and from bytes, loads the same pixels.
    features = datasets.Features({"sku": datasets.Value("string"), "name": datasets.Value("string"),
                                  "img": datasets.Image()})  # fmt: skip
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(
        [{"sku": "pil", "name": "t", "img": pil}, {"sku": "file", "name": "t", "img": str(tmp_path / "images/p1.png")},
         {"sku": "bytes", "name": "t", "img": {"bytes": raw, "path": None}}], features=features)}).save_to_disk(str(saved))
    catalogue = load_catalogue(saved, columns={"id": "sku", "title": "name", "image": "img"}, decode_images=True)
    assert sorted(catalogue.products) == ["bytes", "file", "pil"] and catalogue.pairs == {}
    for product in catalogue.products.values():
        assert catalogue.image(product).tobytes() == want, product.id


def test_a_mapped_column_the_table_lacks_is_named_with_the_columns_it_has(tmp_path: Path):
    _renamed_folder(tmp_path / "parquet", "parquet")
    columns = {**COLUMNS, "id": "product_sku"}
    with pytest.raises(DataError, match=re.escape(
            f"{tmp_path / 'parquet' / 'products.parquet'}: no column 'product_sku' (data.columns.id); its columns: "
            "sku, name, desc, cat, attrs, img, trace, price")):  # fmt: skip
        load_catalogue(tmp_path / "parquet", columns=columns)
    _renamed_folder(tmp_path / "csv", "csv")
    report = validate_catalogue(tmp_path / "csv", columns={**COLUMNS, "positive": "target"})
    assert [str(p) for p in report.problems] == [
        f"pairs_{split}.csv:1: no column 'target' (data.columns.positive); its columns: query, query_img, item, "
        "hard_negs, clicks" for split in ("test", "train")]  # fmt: skip


def test_row_problems_name_the_tables_column(tmp_path: Path):
    folder = _renamed_folder(tmp_path, "jsonl")
    _jsonl(folder / "products.jsonl", [{"sku": "p1", "name": 7, "img": "images/nope.png"}])
    _jsonl(folder / "pairs_train.jsonl", [{"query": "red", "item": "p9"}])
    (folder / "pairs_test.jsonl").unlink()
    report = validate_catalogue(folder, columns=COLUMNS)
    assert [str(p) for p in report.problems] == [
        "products.jsonl:1: field 'name': input should be a valid string, got int 7 (id p1)",
        "pairs_train.jsonl:1: field 'item': unknown product id 'p9'",
    ]
    _jsonl(folder / "products.jsonl", [{"sku": "p1", "name": "t", "img": "images/nope.png"}])
    _jsonl(folder / "pairs_train.jsonl", [{"query": "red", "item": "p1"}])
    with pytest.raises(DataError, match=re.escape("products.jsonl:1: field 'img': image file 'images/nope.png' not "
                                                  "found (id p1)")):  # fmt: skip
        load_catalogue(folder, columns=COLUMNS)


def test_splits_pick_and_rename_a_folders_pair_files_and_galleries(tmp_path: Path):
    expected = _canonical(tmp_path)
    (tmp_path / "pairs_test.jsonl").rename(tmp_path / "pairs_validation.jsonl")
    (tmp_path / "gallery_validation.txt").write_text("p3\np1\n", encoding="utf-8")
    _jsonl(tmp_path / "pairs_extra.jsonl", PAIRS["train"][:1])
    catalogue = load_catalogue(tmp_path, splits={"train": "train", "test": "validation"})
    assert catalogue.pairs == expected.pairs and catalogue.gallery("test") == ["p3", "p1"]
    with pytest.raises(DataError, match=re.escape("has no pairs_heldout (data.splits.test); pair splits: extra, "
                                                  "train, validation")):  # fmt: skip
        load_catalogue(tmp_path, splits={"test": "heldout"})


def test_a_split_data_splits_names_must_exist(tmp_path: Path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(_flat_rows("train"))}).save_to_disk(str(tmp_path))
    _images(tmp_path)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: no split 'validation' (data.splits.test); its "
                                                  "splits: train")):  # fmt: skip
        load_catalogue(tmp_path, columns=FLAT_COLUMNS, splits={"test": "validation"})
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}[train]: no column 'q' (data.columns.query_text)")):
        load_catalogue(tmp_path, columns={**FLAT_COLUMNS, "query_text": "q"})


# ------------------------------------------------------------------------------------------------------------ Hub


def test_hub_references_parse_config_and_revision():
    assert parse_hub_ref("hf:owner/shop") == HubRef("owner/shop")
    assert parse_hub_ref("hf:owner/shop:fashion@v1.0") == HubRef("owner/shop", "fashion", "v1.0")
    assert parse_hub_ref("hf:owner/shop@refs/convert/parquet") == HubRef("owner/shop", None, "refs/convert/parquet")
    assert str(parse_hub_ref("hf:owner/shop:fashion@v1.0")) == "hf:owner/shop:fashion@v1.0"
    with pytest.raises(ValueError, match="write hf:owner/name, hf:owner/name:config"):
        parse_hub_ref("hf:owner/shop/extra")


def _cache_hub_dataset(cache: Path, repo: str, splits: dict[str, list[dict]]) -> None:
    """Put a dataset where `datasets` keeps a Hub dataset it loaded once, as offline loading finds it."""
    import datasets

    built = datasets.load_dataset("parquet", data_files={split: str(_parquet(cache / "src", split, rows))
                                                         for split, rows in splits.items()},
                                  cache_dir=str(cache / "build"))  # fmt: skip
    source = Path(next(iter(built.values())).cache_files[0]["filename"]).parent
    target = cache / repo.replace("/", "___") / "default" / "0.0.0" / source.name
    target.mkdir(parents=True)
    for file in source.iterdir():
        shutil.copy(file, target / file.name.replace("parquet-", f"{repo.split('/')[1]}-"))


def _parquet(folder: Path, name: str, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _write_parquet(folder / f"{name}.parquet", rows)
    return folder / f"{name}.parquet"


def test_a_hub_dataset_loads_from_the_local_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = {"train": [{k: v for k, v in r.items() if k not in ("img", "query_img")} for r in _flat_rows("train")],
            "test": [{k: v for k, v in r.items() if k not in ("img", "query_img")} for r in _flat_rows("test")]}
    _cache_hub_dataset(tmp_path / "cache", "owner/shop", rows)
    columns = {k: v for k, v in FLAT_COLUMNS.items() if k not in ("image", "query_image")}
    catalogue = load_catalogue("hf:owner/shop", columns=columns, splits={"train": "train", "test": "test"})
    assert list(catalogue.products) == ["p1", "p2", "p3"] and catalogue.products["p1"].title == "red shirt"
    assert [pair.anchor.text for pair in catalogue.pairs["test"]] == ["lamp"]
    assert len(catalogue.pairs["train"]) == 2  # the image-only query has no text now: no pair
    report = validate_catalogue("hf:owner/shop", columns={**columns, "title": "title"})
    assert str(report.problems[0]) == ("hf:owner/shop[train]: no column 'title' (data.columns.title); its columns: sku, name, "
                                       "desc, cat, attrs, trace, price, query")  # fmt: skip


def test_a_hub_dataset_missing_from_the_cache_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError) as info:
        load_catalogue("hf:owner/absent:fashion@v2")
    message = str(info.value)
    assert message.startswith("Hugging Face dataset 'hf:owner/absent:fashion@v2' is not in the local cache")
    assert "datasets.load_dataset('owner/absent', 'fashion', revision='v2')" in message
    assert "hf download --repo-type dataset owner/absent --revision v2 --local-dir DIR" in message


# ------------------------------------------------------------------------------------------------------------ recipe


def test_recipe_columns_and_splits_are_checked_and_passed_to_the_loader(tmp_path: Path):
    from moon_rl.data.catalogue import load_recipe_catalogue
    from moon_rl.errors import RecipeError
    from moon_rl.recipe import load_recipe
    from moon_rl.recipe.environment import catalogue_problems

    folder = _renamed_folder(tmp_path / "shop", "parquet")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"data: {{catalogue: shop, columns: {json.dumps(COLUMNS)}, splits: {{train: train}}}}\n")
    recipe = load_recipe(recipe_file)
    assert recipe.data.catalogue == str(folder) and catalogue_problems(recipe) == []
    catalogue = load_recipe_catalogue(recipe.data)
    assert catalogue.pairs == {"train": _canonical(tmp_path / "canonical").pairs["train"]}
    with pytest.raises(RecipeError, match=re.escape("unknown moon-rl field 'sku' (valid: id, title, description")):
        load_recipe(recipe_file, ["data.columns={sku: id}"])
    with pytest.raises(RecipeError, match="map either `image`"):
        load_recipe(recipe_file, ["data.columns={image: a, images: b}"])
    hub = load_recipe(recipe_file, ["data.catalogue=hf:owner/shop:fashion@main"])
    assert hub.data.catalogue == "hf:owner/shop:fashion@main" and catalogue_problems(hub) == []  # not a path
    with pytest.raises(RecipeError, match="is not a Hub dataset reference"):
        load_recipe(recipe_file, ["data.catalogue=hf:owner/shop/x"])


def test_data_validate_command_takes_the_column_mapping(tmp_path: Path):
    from typer.testing import CliRunner

    from moon_rl.cli import app

    folder = _renamed_folder(tmp_path, "parquet")
    args = ["data", "validate", str(folder)] + [f"--column={k}={v}" for k, v in COLUMNS.items()]
    ok = CliRunner().invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert "3 products, pairs: test 1, train 3; OK" in ok.output
    bad = CliRunner().invoke(app, [*args, "--column", "title=label"])
    assert bad.exit_code == 2 and "products.parquet: no column 'label' (data.columns.title)" in bad.output
    assert CliRunner().invoke(app, [*args, "--column", "name"]).exit_code == 2


def test_an_annotated_copy_of_a_mapped_catalogue_trains_without_the_mapping(tmp_path: Path):
    from typer.testing import CliRunner

    from moon_rl.cli import app
    from moon_rl.data.catalogue import load_recipe_catalogue
    from moon_rl.recipe import load_recipe

    _renamed_folder(tmp_path / "shop", "parquet")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"data: {{catalogue: shop, columns: {json.dumps(COLUMNS)}}}\n")
    result = CliRunner().invoke(app, ["annotate", str(recipe_file), "--template", "--out", str(tmp_path / "copy")])
    assert result.exit_code == 0, result.output
    assert "--set 'data.columns={}' --set 'data.splits={}'" in result.output
    copy = load_recipe_catalogue(load_recipe(recipe_file, [f"data.catalogue={tmp_path / 'copy'}", "data.columns={}",
                                                           "data.splits={}"]).data)  # fmt: skip
    expected = _canonical(tmp_path / "canonical")
    assert list(copy.products) == list(expected.products) and copy.products["p2"].reasoning is not None
    assert {split: [(p.positive, p.negatives) for p in pairs] for split, pairs in copy.pairs.items()} == {
        split: [(p.positive, p.negatives) for p in pairs] for split, pairs in expected.pairs.items()}
    # Image paths are re-rooted at the copy (nothing is copied): they still open the source's files.
    image = copy.pairs["train"][2].anchor.image
    assert copy.image(image).tobytes() == expected.image(expected.pairs["train"][2].anchor.image).tobytes()


# ------------------------------------------------------------------------------------------------------------ e2e


@pytest.mark.slow
def test_a_renamed_parquet_folder_trains_and_evaluates_through_data_columns(tmp_path: Path, synthetic_catalogue):
    """The acceptance run: a parquet folder with its own column names (image bytes, query images as bytes, a test split
    called `validation`) trains a few SFT steps and is evaluated, with no conversion; the evaluation is the one of the
    canonical catalogue it was written from."""
    from moon_rl.evaluation.report import read_results, run_eval
    from moon_rl.evaluation.retrieval import evaluate_embedder
    from moon_rl.modeling.embedder import MoonEmbedder
    from moon_rl.recipe import load_recipe
    from moon_rl.training.sft import run_sft

    source = synthetic_catalogue(48, 3, 56)
    canonical = load_catalogue(source)
    shop = tmp_path / "shop"
    shop.mkdir()

    def image_bytes(ref: str | None) -> bytes | None:
        return None if ref is None else (source / ref).read_bytes()

    _write_parquet(shop / "products.parquet", [
        {"sku": p.id, "name": p.title, "desc": p.description, "cat": p.category, "attrs": p.attributes,
         "img": image_bytes(p.images[0]), "trace": p.reasoning} for p in canonical.products.values()])  # fmt: skip
    queries = {}
    for split, theirs in (("train", "train"), ("test", "validation")):
        rows = [{"query": pair.anchor.text, "query_img": image_bytes(pair.anchor.image), "item": pair.positive,
                 "hard_negs": pair.negatives} for pair in canonical.pairs[split] if not isinstance(pair.anchor, str)]
        _write_parquet(shop / f"pairs_{theirs}.parquet", rows)
        queries[split] = rows
    shutil.copy(source / "gallery_test.txt", shop / "gallery_validation.txt")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(tiny_recipe(
        tmp_path / "run", catalogue=shop, data={"columns": COLUMNS, "splits": {"train": "train", "test": "validation"}},
        sft={**TINY_SFT, "max_steps": 2, "save_steps": 100}, eval={"faithfulness": False}))
    recipe = load_recipe(recipe_file)
    final = run_sft(recipe)
    report = run_eval(recipe, {"sft": final})
    result = read_results(report / "metrics.json")["sft"]
    n_text = sum(1 for row in queries["test"] if row["query"] is not None)
    n_image = sum(1 for row in queries["test"] if row["query"] is None)
    assert result.split == "test" and result.n_queries == {"text->product": n_text, "image->product": n_image}
    assert n_text > 0 and n_image > 0 and result.gallery_size == len(canonical.gallery("test"))
    # The renamed folder is the canonical catalogue's test split under other names: the same model scores the same on
    # both. A column read into the wrong field (title for description, one product's image for another's, ...) gives
    # the model other inputs, and other scores.
    same = evaluate_embedder(MoonEmbedder.load(final), canonical, "test", batch_size=recipe.eval.batch_size,
                             zero_shot=False).modes["direct"]
    for task in ("text->product", "image->product"):
        assert "recall@1" in same[task] and "mrr@10" in same[task]
        got = {metric: result.modes["direct"][task][metric] for metric in same[task]}
        assert got == pytest.approx(same[task], abs=1e-6), task


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_several_positives_and_their_grades_map_and_load(tmp_path: Path, fmt: str):
    """`positives` / `relevance` columns (JSON lists in CSV cells, list columns in parquet) load into the same pairs."""
    write, suffix = WRITERS[fmt]
    _images(tmp_path)
    write(tmp_path / f"products{suffix}", [_renamed_product(r) for r in PRODUCTS])
    write(tmp_path / f"pairs_test{suffix}", [{"query": "shirt or mug", "items": ["p1", "p2"], "grades": [2.0, 1.0]}])
    columns = {k: v for k, v in COLUMNS.items() if k not in ("positive", "negatives", "query_image")}
    catalogue = load_catalogue(tmp_path, columns={**columns, "positives": "items", "relevance": "grades"})
    (pair,) = catalogue.pairs["test"]
    assert (pair.anchor.text, pair.positive_ids, pair.gains) == ("shirt or mug", ["p1", "p2"], {"p1": 2.0, "p2": 1.0})
