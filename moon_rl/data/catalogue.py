"""A catalogue on disk (products, pairs by split, galleries) and `load_catalogue`.

Folder layout (what `moon-rl data synth` writes and what users may provide)::

    products.jsonl | products.csv | products.parquet | products/     (an HF dataset saved with save_to_disk)
    pairs_<split>.<jsonl|csv|parquet> | pairs_<split>/                 (e.g. pairs_train.jsonl, pairs_test.jsonl)
    gallery_<split>.txt                                                (optional; product ids, one per line)
    catalogue.json                                                     (optional manifest)
    images/...                                                         (image paths are relative to this folder)

A path may also name a single products file (or HF dataset folder): a catalogue without pairs.
`builtin:synthetic` is generated once into the cache (see `moon_rl.data.synthetic`) and loaded from there.
A Hub dataset (`hf:owner/name`), a `save_to_disk` DatasetDict or a folder of data files without a products file is
read through `datasets` (see `moon_rl.data.hub`). `data.columns` maps any table's column names onto moon-rl's fields
(`moon_rl.data.columns`), and `data.splits` picks and renames the splits.

`scan_catalogue` walks all of it and hands each `Problem` to a callback: the loader raises on the first one, the
validator (`moon_rl.data.validate`) collects them all.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image
from pydantic import ValidationError

from moon_rl.cache import build_lock
from moon_rl.data.columns import ColumnMap
from moon_rl.data.hub import HF_PREFIX, PRODUCTS_SPLIT, dataset_tables, load_dataset_dict
from moon_rl.data.records import Pair, Product, Query, describe_errors
from moon_rl.data.sources import (
    DEFAULT_MAX_PIXELS,
    TABLE_SUFFIXES,
    Problem,
    Row,
    Table,
    iter_rows,
    iter_text_lines,
    load_image,
    resolve_image_path,
)
from moon_rl.data.synthetic import SyntheticConfig, synthesize, synthetic_cache_dir
from moon_rl.errors import DataError

__all__ = ["BUILTIN_SYNTHETIC", "Catalogue", "CatalogueLayout", "find_layout", "load_catalogue", "scan_catalogue"]

BUILTIN_SYNTHETIC = "builtin:synthetic"
MANIFEST = "catalogue.json"


@dataclass(frozen=True)
class CatalogueLayout:
    """Where each part of a catalogue lives.

    Attributes:
        base_dir (`Path`): the folder image paths are relative to.
        products (`Table`): the products table.
        pairs (`dict[str, Table]`): the pairs tables, by moon-rl split name.
        galleries (`dict[str, Path]`): `gallery_<split>.txt` files, by moon-rl split name.
        manifest (`Path`, *optional*): `catalogue.json`.
        columns (`ColumnMap`): `data.columns`, used to name a problem's field by the table's column.
        source (`str`, *optional*): the `datasets` dataset the tables are splits of (`hf:owner/name`, a folder).
    """

    base_dir: Path
    products: Table
    pairs: dict[str, Table]
    galleries: dict[str, Path]
    manifest: Path | None
    columns: ColumnMap = field(default_factory=ColumnMap)
    source: str | None = None

    def where(self, file: str) -> str:
        """A problem's file as the loader shows it: the path of a catalogue file, a dataset split as named."""
        return file if self.source is not None else str(self.base_dir / file)

    def in_columns(self, problem: Problem) -> Problem:
        """The problem with its field named by the table's column (`sku` for `id`) when `data.columns` maps it."""
        name = self.columns.original(problem.field)
        reason = problem.reason
        if name == problem.field and reason == "required field is missing" and (self.columns.columns or self.source):
            reason += f" (map the column that holds it with data.columns.{name})"
        return replace(problem, field=name, reason=reason)


def _is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


_DATA_SUFFIXES = (".parquet", ".csv", ".json", ".jsonl", ".arrow")


def _has_data_files(folder: Path) -> bool:
    """Whether `datasets.load_dataset(folder)` has something to read (data files, in the folder or below it)."""
    return any(p.suffix in _DATA_SUFFIXES and p.name != MANIFEST for p in folder.rglob("*") if p.is_file())


def _tables(folder: Path, stem: str) -> list[Path]:
    found = [folder / f"{stem}{suffix}" for suffix in TABLE_SUFFIXES if (folder / f"{stem}{suffix}").is_file()]
    return found + ([folder / stem] if _is_hf_dataset_dir(folder / stem) else [])


def _rename_splits(folder: Path, found: dict[str, Any], splits: Mapping[str, str], kind: str) -> dict[str, Any]:
    """Pair files (or galleries) by moon-rl split: `data.splits` picks and renames them when set."""
    if not splits:
        return found
    if PRODUCTS_SPLIT in splits:
        raise DataError(f"catalogue folder {str(folder)!r}: data.splits.{PRODUCTS_SPLIT} names the products split of a "
                        "`datasets` dataset; this folder has a products file")
    if kind == "pairs" and (absent := [f"pairs_{theirs} (data.splits.{ours})" for ours, theirs in splits.items()
                                       if theirs not in found]):
        raise DataError(f"catalogue folder {str(folder)!r} has no {', '.join(absent)}; "
                        f"pair splits: {', '.join(found) or 'none'}")
    return {ours: found[theirs] for ours, theirs in splits.items() if theirs in found}


def _dataset_layout(source: str, folder: Path | None, columns: Mapping[str, str],
                    splits: Mapping[str, str]) -> CatalogueLayout:
    dataset = load_dataset_dict(source if folder is None else folder)
    products, pairs, column_map = dataset_tables(source, dataset, columns, splits)
    base_dir = folder if folder is not None else Path.cwd()
    return CatalogueLayout(base_dir, products, pairs, {}, None, column_map, source)


def find_layout(
    path: str | Path,
    *,
    columns: Mapping[str, str] | None = None,
    splits: Mapping[str, str] | None = None,
) -> CatalogueLayout:
    """Find the products, pairs, galleries and manifest of a catalogue folder, a single products file, a Hub dataset
    (`hf:owner/name[:config][@revision]`) or a folder `datasets` reads.

    Args:
        path (`str | Path`): the catalogue.
        columns (`Mapping[str, str]`, *optional*): `data.columns`, moon-rl field -> the tables' column.
        splits (`Mapping[str, str]`, *optional*): `data.splits`, moon-rl split -> the catalogue's split; when set, only
            these splits are read.

    Raises:
        `DataError`: if there is no products file, more than one file for the products or for one split, a split
            `data.splits` names is absent, or a `datasets` dataset cannot be loaded.
    """
    columns, splits = dict(columns or {}), dict(splits or {})
    if isinstance(path, str) and path.startswith(HF_PREFIX):
        return _dataset_layout(path, None, columns, splits)
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"catalogue {str(path)!r} does not exist")
    if (path / "dataset_dict.json").is_file():  # a DatasetDict saved with save_to_disk: splits, as from the Hub
        return _dataset_layout(str(path), path, columns, splits)
    products_map = ColumnMap(columns, "products")
    if path.is_file() or _is_hf_dataset_dir(path):
        if path.is_file() and path.suffix not in TABLE_SUFFIXES:
            raise DataError(f"catalogue file {str(path)!r}: unsupported type (expected {', '.join(TABLE_SUFFIXES)})")
        return CatalogueLayout(path.parent, Table.file(path, products_map), {}, {}, None, products_map)
    products = _tables(path, "products")
    if not products and not any(path.glob("pairs_*")) and _has_data_files(path):
        return _dataset_layout(str(path), path, columns, splits)
    if not products:
        raise DataError(
            f"catalogue folder {str(path)!r} has no products file "
            "(expected products.jsonl, products.csv, products.parquet or an HF dataset folder products/, "
            "or data files that `datasets` reads, such as train.parquet)"
        )
    if len(products) > 1:
        raise DataError(f"catalogue folder {str(path)!r} has several products files: {[p.name for p in products]}")
    pairs: dict[str, Path] = {}
    for entry in sorted(path.glob("pairs_*")):
        if entry.name.startswith("pairs_") and entry.suffix in TABLE_SUFFIXES and entry.is_file():
            split = entry.stem.removeprefix("pairs_")
        elif _is_hf_dataset_dir(entry):
            split = entry.name.removeprefix("pairs_")
        else:
            # A pairs file we cannot read must not be skipped silently: the split would just be missing.
            raise DataError(
                f"catalogue folder {str(path)!r}: cannot read {entry.name!r} "
                f"(pair files are pairs_<split>{{{','.join(TABLE_SUFFIXES)}}} or a saved HF dataset folder)"
            )
        if split in pairs:
            raise DataError(
                f"catalogue folder {str(path)!r}: split {split!r} has several pair files: "
                f"{pairs[split].name!r} and {entry.name!r}"
            )
        pairs[split] = entry
    galleries = {p.stem.removeprefix("gallery_"): p for p in sorted(path.glob("gallery_*.txt"))}
    pairs = _rename_splits(path, pairs, splits, "pairs")
    galleries = _rename_splits(path, galleries, splits, "galleries")
    manifest = path / MANIFEST
    pairs_map = ColumnMap(columns, "pairs")
    return CatalogueLayout(path, Table.file(products[0], products_map),
                           {split: Table.file(file, pairs_map) for split, file in pairs.items()}, galleries,
                           manifest if manifest.is_file() else None, pairs_map)


@dataclass
class Catalogue:
    """Products, pairs by split and evaluation galleries, with images opened only when asked for.

    Attributes:
        base_dir (`Path`): the folder image paths are relative to.
        products (`dict[str, Product]`): by id, in file order.
        pairs (`dict[str, list[Pair]]`): by split name (`train`, `test`, ...).
        galleries (`dict[str, list[str]]`): explicit galleries (`gallery_<split>.txt`); see `gallery()`.
        manifest (`dict`): `catalogue.json` when present, else empty.
        max_pixels (`int`): the decompression-bomb limit used by `image()`.
    """

    base_dir: Path
    products: dict[str, Product]
    pairs: dict[str, list[Pair]] = field(default_factory=dict)
    galleries: dict[str, list[str]] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def splits(self) -> list[str]:
        """The split names that have pairs."""
        return list(self.pairs)

    def _split_pairs(self, split: str) -> list[Pair]:
        if split not in self.pairs:
            raise DataError(f"catalogue has no split {split!r} (splits: {', '.join(self.pairs) or 'none'})")
        return self.pairs[split]

    def split_products(self, split: str) -> list[Product]:
        """Products that are positives of `split`'s pairs, in order of first appearance."""
        seen = dict.fromkeys(pid for pair in self._split_pairs(split) for pid in pair.positive_ids)
        return [self.products[pid] for pid in seen]

    def gallery(self, split: str) -> list[str]:
        """Product ids to retrieve from when evaluating `split`: `gallery_<split>.txt`, else the split's positives."""
        if split in self.galleries:
            return list(self.galleries[split])
        return [product.id for product in self.split_products(split)]

    def image(self, product_or_ref: Product | str | bytes, index: int = 0) -> Image.Image:
        """Decode an image as RGB: a product's `images[index]`, or an image reference (path or bytes)."""
        if isinstance(product_or_ref, Product):
            if index >= len(product_or_ref.images):
                raise DataError(
                    f"product {product_or_ref.id!r} has no image {index} (it has {len(product_or_ref.images)})"
                )
            product_or_ref = product_or_ref.images[index]
        return load_image(product_or_ref, self.base_dir, max_pixels=self.max_pixels)

    def __len__(self) -> int:
        return len(self.products)


ProblemSink = Callable[[Problem], None]


def _image_reason(ref: str | bytes, base_dir: Path, decode: bool, max_pixels: int) -> str | None:
    """Why an image reference is bad, or None. Without `decode` only path existence is checked (cheap)."""
    if not decode:
        if isinstance(ref, str) and not ref.startswith("data:") and not resolve_image_path(ref, base_dir).is_file():
            return f"image file {ref!r} not found"
        return None
    try:
        load_image(ref, base_dir, max_pixels=max_pixels)
    except DataError as exc:
        return str(exc)
    return None


@dataclass
class _Scan:
    products: dict[str, Product] = field(default_factory=dict)
    invalid_ids: set[str] = field(default_factory=set)
    pairs: dict[str, list[Pair]] = field(default_factory=dict)
    galleries: dict[str, list[str]] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


RecordT = TypeVar("RecordT", Product, Pair)


def _parse_row(row: Row, model: type[RecordT]) -> tuple[RecordT | None, list[tuple[str | None, str]]]:
    """The row as a `model` record, or None with its `(field, reason)` problems (reading errors first)."""
    if row.errors:
        return None, list(row.errors)
    try:
        return model.model_validate(row.data), []
    except ValidationError as exc:
        return None, describe_errors(exc, model)


def _scan_products(layout: CatalogueLayout, scan: _Scan, report: ProblemSink, decode: bool, max_pixels: int) -> None:
    name = layout.products.name
    first_line: dict[str, int | None] = {}
    n_rows = 0
    for row in iter_rows(layout.products):
        n_rows += 1
        where = row.source or name  # the products of a `datasets` dataset come from all of its splits
        product, problems = _parse_row(row, Product)
        if product is None:
            for fld, reason in problems:
                report(Problem(where, row.line, fld, row.id_hint, reason))
            if row.id_hint:
                # Its own problem is reported; pairs that mention it should not add "unknown id" noise.
                scan.invalid_ids.add(row.id_hint)
                first_line.setdefault(row.id_hint, row.line)
            continue
        if product.id in first_line:
            report(
                Problem(
                    where,
                    row.line,
                    "id",
                    product.id,
                    f"duplicate product id {product.id!r} (first defined on line {first_line[product.id]})",
                )
            )
            continue
        scan.products[product.id] = product
        first_line[product.id] = row.line
        for index, ref in enumerate(product.images):
            if reason := _image_reason(ref, layout.base_dir, decode, max_pixels):
                report(Problem(where, row.line, f"images[{index}]", product.id, reason))
    if n_rows == 0:
        report(Problem(name, None, None, None, "catalogue has no products (the products file has no rows)"))


def _scan_galleries(layout: CatalogueLayout, scan: _Scan, report: ProblemSink) -> None:
    for split, path in layout.galleries.items():
        ids: list[str] = []
        seen: set[str] = set()
        for number, text, error in iter_text_lines(path):
            if error is not None:
                report(Problem(path.name, number, None, None, error))
            elif text in seen:
                report(Problem(path.name, number, None, text, f"duplicate gallery id {text!r}"))
            elif text not in scan.products and text not in scan.invalid_ids:
                report(Problem(path.name, number, None, text, f"unknown product id {text!r}"))
            else:
                seen.add(text)
                if text in scan.products:
                    ids.append(text)
        scan.galleries[split] = ids


def _pair_references(pair: Pair) -> list[tuple[str, str]]:
    positives = ([("positive", pair.positive)] if pair.positives is None
                 else [(f"positives[{i}]", p) for i, p in enumerate(pair.positives)])
    refs = positives + [(f"negatives[{i}]", n) for i, n in enumerate(pair.negatives)]
    return ([("anchor", pair.anchor)] if isinstance(pair.anchor, str) else []) + refs


def _scan_pairs(layout: CatalogueLayout, scan: _Scan, report: ProblemSink, decode: bool, max_pixels: int) -> None:
    known = scan.products.keys() | scan.invalid_ids
    for split, path in layout.pairs.items():
        pairs: list[Pair] = []
        gallery = (set(scan.galleries[split]) | scan.invalid_ids) if split in scan.galleries else None
        for row in iter_rows(path):
            pair, problems = _parse_row(row, Pair)
            if pair is None:
                for fld, reason in problems:
                    report(Problem(path.name, row.line, fld, None, reason))
                continue
            for fld, pid in _pair_references(pair):
                if pid not in known:
                    report(Problem(path.name, row.line, fld, None, f"unknown product id {pid!r}"))
            positive_field = "positive" if pair.positives is None else "positives"
            if both := [pid for pid in pair.positive_ids if pid in pair.negatives]:
                report(Problem(path.name, row.line, "negatives", None,
                               f"the positive {both[0]!r} is also listed as a negative"))
            if gallery is not None:
                for pid in pair.positive_ids:
                    if pid in scan.products and pid not in gallery:
                        report(Problem(path.name, row.line, positive_field, None,
                                       f"positive {pid!r} is not in gallery_{split}.txt, so it cannot be retrieved"))
            image = pair.anchor.image if isinstance(pair.anchor, Query) else None
            if image is not None and (reason := _image_reason(image, layout.base_dir, decode, max_pixels)):
                report(Problem(path.name, row.line, "anchor.image", None, reason))
            pairs.append(pair)
        scan.pairs[split] = pairs


def scan_catalogue(
    layout: CatalogueLayout,
    report: ProblemSink,
    *,
    decode_images: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Catalogue:
    """Read every file of a catalogue, handing each problem to `report`; rows with problems are left out.

    Args:
        layout (`CatalogueLayout`): from `find_layout`.
        report (`Callable[[Problem], None]`): called once per problem; raising from it stops the scan.
        decode_images (`bool`, *optional*, defaults to `False`): fully decode every image (slow; the validator does)
            instead of only checking that image files exist.
        max_pixels (`int`, *optional*, defaults to `40_000_000`): decompression-bomb limit.
    """

    def named(problem: Problem) -> None:  # messages name the user's column (`sku`), not moon-rl's field (`id`)
        report(layout.in_columns(problem))

    scan = _Scan()
    if layout.manifest is not None:
        try:
            scan.manifest = json.loads(layout.manifest.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            report(Problem(layout.manifest.name, None, None, None, f"unreadable manifest: {exc}"))
    _scan_products(layout, scan, named, decode_images, max_pixels)
    _scan_galleries(layout, scan, named)
    _scan_pairs(layout, scan, named, decode_images, max_pixels)
    return Catalogue(layout.base_dir, scan.products, scan.pairs, scan.galleries, scan.manifest, max_pixels)


def resolve_catalogue_path(path: str | Path, synthetic: SyntheticConfig | None = None) -> Path | str:
    """A catalogue path on disk, or a Hub dataset reference (`hf:...`) as it is; `builtin:synthetic` is generated into
    the cache first if needed."""
    if str(path).startswith(HF_PREFIX):
        return str(path)
    if str(path) != BUILTIN_SYNTHETIC:
        if str(path).startswith("builtin:"):
            raise DataError(f"unknown builtin catalogue {str(path)!r} (known: {BUILTIN_SYNTHETIC})")
        return Path(path).expanduser()
    options = synthetic or SyntheticConfig()
    out = synthetic_cache_dir(options)
    if not (out / MANIFEST).is_file():
        with build_lock(out):
            if not (out / MANIFEST).is_file():
                synthesize(out, options, replace=False)  # another process may be reading it
    return out


def load_catalogue(
    path: str | Path,
    *,
    synthetic: SyntheticConfig | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode_images: bool = False,
    columns: Mapping[str, str] | None = None,
    splits: Mapping[str, str] | None = None,
) -> Catalogue:
    """Load a catalogue folder, a single products file, a Hub dataset (`hf:owner/name[:config][@revision]`), a folder
    `datasets` reads, or `builtin:synthetic`; fail fast on the first bad row.

    By default images are not decoded here (only their files' existence is checked); `Catalogue.image` decodes on
    demand. Run `validate_catalogue` for a report of every problem.

    Args:
        path (`str | Path`): a catalogue folder, a products file, an `hf:` reference, or `"builtin:synthetic"`.
        synthetic (`SyntheticConfig`, *optional*): options of the builtin synthetic catalogue (defaults otherwise).
        max_pixels (`int`, *optional*, defaults to `40_000_000`): decompression-bomb limit for `Catalogue.image`.
        decode_images (`bool`, *optional*, defaults to `False`): also decode every image once (products' and
            anchors'), so that a corrupt, truncated, oversized or non-image file fails here, not mid-run.
        columns (`Mapping[str, str]`, *optional*): `data.columns`, moon-rl field -> the tables' column.
        splits (`Mapping[str, str]`, *optional*): `data.splits`, moon-rl split -> the catalogue's split.

    Raises:
        `DataError`: `<folder>/file:line: field 'x': reason (id ...)` for the first problem found.
    """
    folder = resolve_catalogue_path(path, synthetic)
    layout = find_layout(folder, columns=columns, splits=splits)

    def fail(problem: Problem) -> None:
        raise DataError(str(replace(problem, file=layout.where(problem.file))))

    return scan_catalogue(layout, fail, decode_images=decode_images, max_pixels=max_pixels)


def load_recipe_catalogue(data: Any, path: str | Path | None = None, *, decode_images: bool = True) -> Catalogue:
    """The catalogue a recipe's `data` section names (or `path` instead), with its `synthetic` options, `columns` and
    `splits` applied.

    Images are decoded once up front by default: the stages that call this (data, SFT, GRPO, eval) would otherwise
    meet a broken image only when a batch reaches it, after writing checkpoints (0.4 s for the default 600-product
    synthetic catalogue).
    """
    return load_catalogue(path or data.catalogue, synthetic=SyntheticConfig(**data.synthetic.model_dump()),
                          decode_images=decode_images, columns=data.columns, splits=data.splits)
