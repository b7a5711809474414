"""Catalogues that `datasets` reads: a Hugging Face Hub dataset, a `save_to_disk` DatasetDict, a folder of data files.

`data.catalogue` names one as `hf:owner/name`, `hf:owner/name:config`, `hf:owner/name@revision` or
`hf:owner/name:config@revision` (loaded with `datasets.load_dataset`, so the local cache serves it offline), or as a
folder: a `save_to_disk` DatasetDict, or data files `datasets.load_dataset(folder)` reads (`train.parquet` and
`test.parquet`, `data/train-*.parquet` as a Hub repository keeps them, CSV, JSON lines, an image folder).

Such a dataset is a set of splits; `data.splits` (moon-rl split -> the dataset's split) picks and renames them: when
it is set, only the splits it lists are read. The splits become a catalogue in one of two ways:

- a split named `products` (after `data.splits`) is the products table, and every other split a pairs table
  (`anchor`, `positive`, `negatives`), as in a catalogue folder;
- otherwise every row is a product and, when its split has queries (an `anchor` column, or the `query_text` /
  `query_image` columns `data.columns` maps), also a pair: the row's query should retrieve the row's product. A row
  whose query is empty only lists its product, and a product repeated with the same fields (a query-product dataset
  repeats it for each query) is listed once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moon_rl.data.columns import ColumnMap
from moon_rl.data.sources import Row, Table, dataset_records, table_rows
from moon_rl.errors import DataError

__all__ = ["HF_PREFIX", "PRODUCTS_SPLIT", "HubRef", "dataset_tables", "load_dataset_dict", "parse_hub_ref"]

HF_PREFIX = "hf:"
#: The split of a `datasets` dataset that holds the products (rename yours with `data.splits: {products: ...}`).
PRODUCTS_SPLIT = "products"
_HUB_RE = re.compile(r"^hf:(?P<repo>[\w.-]+(?:/[\w.-]+)?)(?::(?P<config>[^:@]+))?(?:@(?P<revision>[^@]+))?$")
_HUB_SYNTAX = "hf:owner/name, hf:owner/name:config, hf:owner/name@revision or hf:owner/name:config@revision"


@dataclass(frozen=True)
class HubRef:
    """A Hugging Face Hub dataset: `repo` (`owner/name`), an optional `config` and `revision`."""

    repo: str
    config: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return (f"{HF_PREFIX}{self.repo}" + (f":{self.config}" if self.config else "")
                + (f"@{self.revision}" if self.revision else ""))


def parse_hub_ref(text: str) -> HubRef:
    """Read `hf:owner/name[:config][@revision]`.

    Raises:
        `ValueError`: naming the accepted forms.
    """
    match = _HUB_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a Hub dataset reference; write {_HUB_SYNTAX}")
    return HubRef(match["repo"], match["config"], match["revision"])


def _not_cached(ref: HubRef, exc: Exception) -> DataError:
    args = ", ".join([repr(ref.repo)] + ([repr(ref.config)] if ref.config else [])
                     + ([f"revision={ref.revision!r}"] if ref.revision else []))
    why = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") \
        else "the Hub cannot be reached"
    return DataError(
        f"Hugging Face dataset {str(ref)!r} is not in the local cache ({why}: {exc}). Load it once on a machine with "
        f"internet access and the same HF_HOME (`python -c \"import datasets; datasets.load_dataset({args})\"`), or "
        f"download its files (`hf download --repo-type dataset {ref.repo}"
        + (f" --revision {ref.revision}" if ref.revision else "")
        + " --local-dir DIR`) and set data.catalogue to DIR"
    )


def _load_hub(ref: HubRef) -> Any:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        return datasets.load_dataset(ref.repo, ref.config, revision=ref.revision)
    except DatasetNotFoundError as exc:
        raise DataError(f"Hugging Face dataset {str(ref)!r} not found on the Hub or in the local cache: {exc}") from None
    except (ConnectionError, FileNotFoundError) as exc:
        raise _not_cached(ref, exc) from None
    except ValueError as exc:  # an unknown config or split names the ones there are
        raise DataError(f"Hugging Face dataset {str(ref)!r}: {exc}") from None


def load_dataset_dict(source: str | Path) -> Any:
    """The `datasets.DatasetDict` of a Hub reference, a `save_to_disk` folder, or a folder of data files.

    Raises:
        `DataError`: the dataset cannot be loaded (not cached, not found, no data files), naming it and the fix.
    """
    import datasets

    if isinstance(source, str) and source.startswith(HF_PREFIX):
        loaded = _load_hub(parse_hub_ref(source))
    else:
        folder = Path(source)
        saved = (folder / "dataset_dict.json").is_file() or (folder / "dataset_info.json").is_file()
        try:
            loaded = datasets.load_from_disk(str(folder)) if saved else datasets.load_dataset(str(folder))
        except FileNotFoundError as exc:  # no data files `datasets` recognises
            raise DataError(f"catalogue folder {str(folder)!r}: {exc}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _pick_splits(name: str, available: list[str], splits: Mapping[str, str]) -> dict[str, str]:
    """moon-rl split -> dataset split: every split as it is named, or only those `data.splits` lists."""
    if not splits:
        return {split: split for split in available}
    absent = [f"{theirs!r} (data.splits.{ours})" for ours, theirs in splits.items() if theirs not in available]
    if absent:
        raise DataError(f"{name}: no split {', '.join(absent)}; its splits: {', '.join(available)}")
    return dict(splits)


def _flat_products(name: str, parts: list[tuple[str, Any]], columns: ColumnMap) -> Iterator[Row]:
    """Every split's rows read as products, a product repeated with the same fields listed once."""
    seen: dict[str, dict[str, Any]] = {}
    for split_name, dataset in parts:
        source = f"{name}[{split_name}]"
        for row in table_rows(*dataset_records(dataset), columns):
            row.source = source
            if row.data is not None and isinstance(row.data.get("id"), str):
                if seen.get(row.data["id"]) == row.data:
                    continue
                seen.setdefault(row.data["id"], row.data)
            yield row


def _split_table(table_name: str, dataset: Any, columns: ColumnMap) -> Table:
    return Table(table_name, columns, read=lambda: table_rows(*dataset_records(dataset), columns))


def dataset_tables(name: str, dataset: Any, columns: Mapping[str, str],
                   splits: Mapping[str, str]) -> tuple[Table, dict[str, Table], ColumnMap]:
    """The products table and the pairs tables (by moon-rl split) of a `datasets.DatasetDict`.

    Args:
        name (`str`): how problems name the dataset (a split's rows are `<name>[<split>]`).
        dataset (`datasets.DatasetDict`): the loaded dataset.
        columns (`Mapping[str, str]`): `data.columns`.
        splits (`Mapping[str, str]`): `data.splits` (empty: every split, as named).

    Returns:
        `(products, pairs, columns)`: the tables, and the `ColumnMap` that names problems' fields as columns.
    """
    chosen = _pick_splits(name, list(dataset), splits)
    if PRODUCTS_SPLIT in chosen:
        theirs = chosen.pop(PRODUCTS_SPLIT)
        products = _split_table(f"{name}[{theirs}]", dataset[theirs], ColumnMap(columns, "products"))
        pair_map = ColumnMap(columns, "pairs")
        pairs = {ours: _split_table(f"{name}[{split}]", dataset[split], pair_map) for ours, split in chosen.items()}
        return products, pairs, pair_map
    product_map, pair_map = ColumnMap(columns, "products", flat=True), ColumnMap(columns, "pairs", flat=True)
    parts = [(split, dataset[split]) for split in dict.fromkeys(chosen.values())]
    products = Table(name, product_map, read=lambda: _flat_products(name, parts, product_map))
    pairs = {ours: _split_table(f"{name}[{split}]", dataset[split], pair_map)
             for ours, split in chosen.items() if pair_map.gives_pairs(dataset[split].column_names)}
    return products, pairs, pair_map
