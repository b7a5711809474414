"""`data.columns`: reading tables whose column names are not moon-rl's, without converting them.

A `ColumnMap` renames a raw row's columns to moon-rl fields before the row is parsed, so every reader (JSONL, CSV,
parquet, saved HF datasets, `datasets` splits) and every check downstream sees the catalogue format. Two fields exist
only here, because a dataset's columns are flat where the catalogue format nests:

- `image`: one image column (bytes, a path, an HF `Image` cell or a PIL image); it becomes `images: [image]`.
- `query_text` / `query_image`: an inline query's text and image columns; they become `anchor: {text, image}`.

With a mapping, a table's other columns are ignored (datasets carry prices, scores, ...); without one, every column
must be a moon-rl field, so that a misspelt column is an error. `original()` turns a problem's field back into the
dataset's column name, so messages name what the user has.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from moon_rl.errors import MoonError

__all__ = ["COLUMN_FIELDS", "PAIR_FIELDS", "PRODUCT_FIELDS", "ColumnMap", "column_map_problems", "parse_name_pairs"]

PRODUCT_FIELDS: tuple[str, ...] = ("id", "title", "description", "category", "attributes", "images", "image",
                                   "reasoning")
PAIR_FIELDS: tuple[str, ...] = ("anchor", "positive", "positives", "relevance", "negatives", "query_text", "query_image")
#: The moon-rl fields `data.columns` may map (`image`, `query_text` and `query_image` exist only as mapping targets).
COLUMN_FIELDS: tuple[str, ...] = PRODUCT_FIELDS + PAIR_FIELDS
_VIRTUAL = ("image", "query_text", "query_image")
_QUERY = ("query_text", "query_image")
_HEAD_RE = re.compile(r"^([A-Za-z_]+)(.*)$")

Role = Literal["products", "pairs"]


def column_map_problems(columns: Mapping[str, str]) -> list[str]:
    """What is wrong with a `data.columns` mapping (moon-rl field -> dataset column); empty when it is usable."""
    problems = [
        f"unknown moon-rl field {name!r} (valid: {', '.join(COLUMN_FIELDS)})" for name in columns if name not in COLUMN_FIELDS
    ]
    problems += [f"{name!r} maps to an empty column name" for name, column in columns.items() if not column]
    if "image" in columns and "images" in columns:
        problems.append("map either `image` (one image column) or `images` (a list column), not both")
    if "anchor" in columns and any(name in columns for name in _QUERY):
        problems.append("map either `anchor` (a product id or {text, image} column) or `query_text` / `query_image`")
    return problems


def _fields(role: Role) -> tuple[str, ...]:
    return PRODUCT_FIELDS if role == "products" else PAIR_FIELDS


@dataclass(frozen=True)
class ColumnMap:
    """How one table's columns become moon-rl fields.

    Args:
        columns (`Mapping[str, str]`, *optional*): moon-rl field -> the table's column (`data.columns`); empty reads
            the table as it is.
        role (`str`, *optional*, defaults to `"products"`): what the table's rows are read as: `products` or `pairs`.
        flat (`bool`, *optional*, defaults to `False`): the rows carry a product *and* a query of it (a `datasets`
            split): the other role's columns are dropped even without a mapping, and a pair's positive is the row's
            product `id`.
    """

    columns: Mapping[str, str] = field(default_factory=dict)
    role: Role = "products"
    flat: bool = False

    def column(self, name: str) -> str | None:
        """The table column a moon-rl field is read from (None for a query field that is not mapped)."""
        if name == "positive" and self.flat and "positive" not in self.columns:
            return self.column("id")
        if name in self.columns:
            return self.columns[name]
        return None if name in _VIRTUAL else name

    def missing(self, table_columns: Iterable[str]) -> str | None:
        """Why a table with these columns cannot be read through this mapping (a mapped column is absent), or None."""
        have = list(table_columns)
        needed = [(name, self.columns[name]) for name in _fields(self.role) if name in self.columns]
        if self.flat and self.role == "pairs" and "positive" not in self.columns:
            needed.append(("id", self.column("id") or "id"))
        absent = [f"{column!r} (data.columns.{name})" if name in self.columns else repr(column)
                  for name, column in needed if column not in have]
        if not absent:
            return None
        return f"no column {', '.join(absent)}; its columns: {', '.join(have) or 'none'}"

    def gives_pairs(self, table_columns: Iterable[str]) -> bool:
        """Whether a `datasets` split with these columns holds queries: `data.columns` maps an anchor or query column,
        or the split has an `anchor` column."""
        return any(name in self.columns for name in ("anchor", *_QUERY)) or "anchor" in set(table_columns)

    def apply(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The row with moon-rl field names: mapped columns renamed, `image` / `query_*` nested, others dropped.

        Without a mapping, a table that is not `flat` is returned as it is. Null cells count as absent.
        """
        if not self.columns and not self.flat:
            return raw
        out: dict[str, Any] = {}
        for name in _fields(self.role):
            column = self.column(name)
            if column is None or raw.get(column) is None:
                continue
            value = raw[column]
            if name == "image":
                out["images"] = [value]
            elif name in _QUERY:
                out.setdefault("anchor", {})[name.removeprefix("query_")] = value
            else:
                out[name] = value
        if not self.columns and self.role == "products":  # flat, no mapping: unknown columns reach the parser
            out.update({key: value for key, value in raw.items() if key not in COLUMN_FIELDS})
        return out

    def original(self, name: str | None) -> str | None:
        """A problem's field (`id`, `images[0]`, `anchor.text`) as the table's column (`sku`, `img`, `query`)."""
        match = _HEAD_RE.match(name or "")
        if match is None or not (self.columns or self.flat):
            return name
        head, rest = match.groups()
        if head == "images" and "image" in self.columns:
            return self.columns["image"]
        if head == "anchor" and any(q in self.columns for q in _QUERY):
            part = rest.removeprefix(".").split(".")[0]
            if f"query_{part}" in self.columns:
                return self.columns[f"query_{part}"]
            return " / ".join(self.columns[q] for q in _QUERY if q in self.columns)
        column = self.column(head)
        return f"{column}{rest}" if column is not None else name


def parse_name_pairs(values: list[str] | None, option: str) -> dict[str, str]:
    """`--column id=sku --column title=name` as `{"id": "sku", "title": "name"}` (`option` names the flag in errors)."""
    out = {}
    for value in values or []:
        ours, sep, theirs = value.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise MoonError(f"{option} {value!r}: expected NAME=VALUE, e.g. {option} id=sku")
        out[ours.strip()] = theirs.strip()
    return out
