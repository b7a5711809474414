"""Reading catalogue tables: rows from JSONL / CSV / parquet / saved HF datasets / `datasets` splits, text lines, and
images.

Every reader yields *all* rows, each carrying the problems found while reading it, so the same code serves the
fail-fast loader (`load_catalogue` raises on the first problem) and the validator (which collects every problem).
Rows come back as plain dicts in the JSONL shape, columns renamed by the table's `ColumnMap` (`data.columns`) first;
turning them into `Product` / `Pair` is the caller's job.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from moon_rl.data.columns import ColumnMap
from moon_rl.errors import DataError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "TABLE_SUFFIXES",
    "Problem",
    "Row",
    "Table",
    "iter_rows",
    "table_rows",
    "iter_text_lines",
    "load_image",
    "resolve_image_path",
]

DEFAULT_MAX_PIXELS = 40_000_000
TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet")
# Columns whose CSV cells (and parquet/HF string cells) may hold JSON, per the catalogue format.
JSON_COLUMNS = ("attributes", "images", "negatives", "anchor", "positives", "relevance")
_LIST_COLUMNS = ("images", "negatives", "positives", "relevance")
_ID_RE = re.compile(r'"id"\s*:\s*"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a catalogue.

    Args:
        file (`str`): the file, relative to the catalogue folder.
        line (`int`, *optional*): 1-based line (text files) or row (parquet / HF datasets); None for the whole file.
        field (`str`, *optional*): the offending field, e.g. `images[0]` or `anchor.text`.
        id (`str`, *optional*): the row's product id when known.
        reason (`str`): what is wrong, in words.
    """

    file: str
    line: int | None
    field: str | None
    id: str | None
    reason: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        text = f"{where}: field {self.field!r}: {self.reason}" if self.field else f"{where}: {self.reason}"
        return f"{text} (id {self.id})" if self.id else text


@dataclass
class Row:
    """A row as read from a file: `data` in the JSONL shape, or `errors` if it could not be read.

    `source` names the table the row came from when it differs from the one being read (the products of a `datasets`
    dataset are read from all of its splits).
    """

    line: int | None
    data: dict[str, Any] | None
    errors: list[tuple[str | None, str]] = field(default_factory=list)
    id_hint: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Table:
    """One table of a catalogue: a file or saved HF dataset folder, or the rows of a `datasets` split.

    Args:
        name (`str`): how problems name it: the file name (relative to the catalogue folder), or `<source>[<split>]`.
        columns (`ColumnMap`, *optional*): how its columns become moon-rl fields (default: as they are).
        path (`Path`, *optional*): the file or folder to read.
        read (`Callable[[], Iterator[Row]]`, *optional*): the rows, for tables that are not files.
    """

    name: str
    columns: ColumnMap = field(default_factory=ColumnMap)
    path: Path | None = None
    read: Callable[[], Iterator[Row]] | None = field(default=None, compare=False)

    @classmethod
    def file(cls, path: Path, columns: ColumnMap | None = None) -> Table:
        """The table of a file (or saved HF dataset folder), named by its file name."""
        return cls(path.name, columns or ColumnMap(), path)


def _utf8_error(exc: UnicodeDecodeError) -> str:
    bad = exc.object[exc.start : exc.start + 1]
    return f"not valid UTF-8 (byte 0x{bad.hex()} at column {exc.start + 1}); save the file as UTF-8"


def _decode_lines(raw: bytes) -> list[tuple[int, str, str | None]]:
    """Split bytes into `(line_number, text, error or None)`; a bad line does not stop the others.

    For a line that is not UTF-8 the text is a lossy decoding (so an id can still be read off it) and `error` says why.
    """
    if raw.startswith(b"\xef\xbb\xbf"):  # a BOM from spreadsheet exports is not part of the data
        raw = raw[3:]
    out: list[tuple[int, str, str | None]] = []
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            out.append((number, chunk.decode("utf-8").rstrip("\r"), None))
        except UnicodeDecodeError as exc:
            out.append((number, chunk.decode("utf-8", "replace").rstrip("\r"), _utf8_error(exc)))
    if out and out[-1][1] == "":  # the final newline does not start a line
        out.pop()
    return out


def iter_text_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """Yield `(line_number, stripped text, error)` for each non-blank, non-comment line of a UTF-8 text file."""
    for number, text, error in _decode_lines(Path(path).read_bytes()):
        if error is not None:
            yield number, None, error
        elif text.strip() and not text.lstrip().startswith("#"):
            yield number, text.strip(), None


def iter_rows(table: Path | Table) -> Iterator[Row]:
    """Yield every row of a table: a `.jsonl`, `.csv` or `.parquet` file, a saved HF dataset folder, or a `Table`
    (whose `ColumnMap` renames the columns first).

    Raises:
        `DataError`: if the path is none of these (callers check the layout first).
    """
    if not isinstance(table, Table):
        table = Table.file(Path(table))
    if table.read is not None:
        yield from table.read()
        return
    path, columns = Path(str(table.path)), table.columns
    if path.is_dir():
        yield from _iter_tabular(path, _read_hf_dir, columns)
    elif path.suffix == ".jsonl":
        yield from _iter_jsonl(path, columns)
    elif path.suffix == ".csv":
        yield from _iter_csv(path, columns)
    elif path.suffix == ".parquet":
        yield from _iter_tabular(path, _read_parquet, columns)
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (expected one of {', '.join(TABLE_SUFFIXES)})")


def _id_hint(data: dict[str, Any]) -> str | None:
    return data.get("id") if isinstance(data.get("id"), str) else None


def _iter_jsonl(path: Path, columns: ColumnMap) -> Iterator[Row]:
    for number, text, error in _decode_lines(path.read_bytes()):
        if error is not None:
            match = _ID_RE.search(text)
            yield Row(number, None, [(None, error)], match.group(1) if match else None)
            continue
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            match = _ID_RE.search(text)
            hint = match.group(1) if match else None
            yield Row(number, None, [(None, f"malformed JSON: {exc.msg} at column {exc.colno}")], hint)
            continue
        if not isinstance(data, dict):
            yield Row(number, None, [(None, f"expected a JSON object, got {type(data).__name__}")])
            continue
        data = columns.apply(data)
        yield Row(number, data, [], _id_hint(data))


def _parse_json_cell(column: str, cell: str) -> tuple[Any, str | None]:
    """CSV / string cells of JSON columns: JSON when they look like it, else a plain string (a path or an id)."""
    stripped = cell.strip()
    if stripped[:1] in "[{":
        try:
            return json.loads(stripped), None
        except json.JSONDecodeError as exc:
            return None, f"malformed JSON in cell: {exc.msg} at column {exc.colno}"
    return ([cell] if column in _LIST_COLUMNS else cell), None


def _iter_csv(path: Path, columns: ColumnMap) -> Iterator[Row]:
    lines = _decode_lines(path.read_bytes())
    bad = {number: error for number, _, error in lines if error is not None}
    # Undecodable lines are decoded lossily so the csv parser still finds row bounds; their rows are reported, not read.
    text = "\n".join(t for _, t, _ in lines)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        yield Row(1, None, [(None, f"malformed CSV header: {exc}")])
        return
    if 1 in bad:
        yield Row(1, None, [(None, bad[1])])
        return
    names = [c.strip() for c in header]
    if reason := columns.missing(names):
        yield Row(1, None, [(None, reason)])
        return
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield Row(start, None, [(None, f"malformed CSV: {exc}")])
            return
        if bad_here := [bad[n] for n in range(start, reader.line_num + 1) if n in bad]:
            yield Row(start, None, [(None, error) for error in bad_here])
            continue
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(names):
            yield Row(start, None, [(None, f"expected {len(names)} cells (the header's), got {len(cells)}")])
            continue
        yield _csv_row(start, columns, names, cells)


def _csv_row(line: int, columns: ColumnMap, names: list[str], cells: list[str]) -> Row:
    required = {columns.column(name) for name in ("id", "title", "positive")}
    # An empty cell is a missing optional value; required fields keep theirs, so that the error says "too short".
    raw = {name: cell for name, cell in zip(names, cells, strict=True) if cell != "" or name in required}
    data: dict[str, Any] = {}
    errors: list[tuple[str | None, str]] = []
    for key, value in columns.apply(raw).items():
        if key in JSON_COLUMNS and isinstance(value, str):
            value, error = _parse_json_cell(key, value)
            if error:
                errors.append((key, error))
                continue
        data[key] = value
    return Row(line, None if errors else data, errors, _id_hint(data))


def _read_parquet(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return table.column_names, table.to_pylist()


def dataset_records(dataset: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """A `datasets.Dataset`'s column names and rows, with `Image` cells kept as `{bytes, path}` (not decoded)."""
    # Arrow format skips decoding `Image` features into PIL: images stay {bytes, path} until asked for.
    return list(dataset.column_names), dataset.with_format("arrow")[0 : len(dataset)].to_pylist()


def _read_hf_dir(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise ValueError(f"expected one dataset, got a DatasetDict with splits {sorted(loaded)}")
        loaded = next(iter(loaded.values()))
    return dataset_records(loaded)


def _iter_tabular(path: Path, read: Any, columns: ColumnMap) -> Iterator[Row]:
    try:
        names, records = read(path)
    except Exception as exc:  # pyarrow / datasets raise many types for a corrupt file; all mean "unreadable"
        yield Row(None, None, [(None, f"cannot read {path.name}: {type(exc).__name__}: {exc}")])
        return
    yield from table_rows(names, records, columns)


def table_rows(names: list[str], records: Iterable[dict[str, Any]], columns: ColumnMap) -> Iterator[Row]:
    """The rows of a parquet / arrow table (`names` are its columns), renamed by `columns` and in the JSONL shape.

    A column the mapping needs and the table lacks is one problem for the whole table. A `flat` pairs table (a
    `datasets` split) skips rows without a query: those rows only list their product.
    """
    if reason := columns.missing(names):
        yield Row(None, None, [(None, reason)])
        return
    for number, record in enumerate(records, start=1):
        mapped = columns.apply(record)
        if columns.flat and columns.role == "pairs" and "anchor" not in mapped:
            continue
        data, errors = _normalize_record(mapped)
        yield Row(number, None if errors else data, errors, _id_hint(data))


def _normalize_image(item: Any) -> Any:
    # HF `Image` features store {"bytes": ..., "path": ...}; prefer the bytes, which need no file.
    if isinstance(item, dict) and ("bytes" in item or "path" in item):
        return item.get("bytes") or item.get("path")
    if isinstance(item, Image.Image):  # rows built in Python (a `datasets` row read with decoding on)
        buffer = io.BytesIO()
        item.save(buffer, format=item.format if item.format in ("PNG", "JPEG", "WEBP") else "PNG")
        return buffer.getvalue()
    if isinstance(item, bytearray | memoryview):
        return bytes(item)
    return item


def _normalize_record(record: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str | None, str]]]:
    """Map parquet / arrow shapes (nulls, maps as pairs, structs with null members) to the JSONL shape."""
    data: dict[str, Any] = {}
    errors: list[tuple[str | None, str]] = []
    for key, value in record.items():
        if value is None:
            continue  # a null column cell is an absent optional value
        if key in JSON_COLUMNS and isinstance(value, str):
            value, error = _parse_json_cell(key, value)
            if error:
                errors.append((key, error))
                continue
        if key == "attributes" and isinstance(value, list):
            value = dict(value)  # arrow map<str, str> comes back as [(key, value), ...]
        if key in ("attributes", "anchor") and isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not None}
        if key == "anchor" and isinstance(value, dict) and "image" in value:
            value["image"] = _normalize_image(value["image"])
        if key == "images" and isinstance(value, list):
            value = [_normalize_image(item) for item in value]
        data[key] = value
    return data, errors


def resolve_image_path(ref: str, base_dir: Path) -> Path:
    """The file an image path refers to: absolute as given, otherwise relative to the catalogue folder."""
    path = Path(ref).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path


def _image_bytes(ref: str | bytes, base_dir: Path) -> tuple[bytes, str]:
    if isinstance(ref, bytes):
        return ref, f"image bytes ({len(ref)} bytes)"
    if ref.startswith("data:"):
        name = f"image data URI ({len(ref)} chars)"
        header, _, payload = ref.partition(",")
        if not header.endswith(";base64"):
            raise DataError(f"{name} is not base64-encoded (expected 'data:image/...;base64,...')")
        try:
            return base64.b64decode(payload, validate=True), name
        except binascii.Error as exc:
            raise DataError(f"{name} has invalid base64: {exc}") from None
    name = f"image file {ref!r}"
    path = resolve_image_path(ref, base_dir)
    try:
        return path.read_bytes(), name
    except FileNotFoundError:
        raise DataError(f"{name} not found") from None
    except OSError as exc:
        raise DataError(f"{name} cannot be read: {exc.strerror or exc}") from None


def load_image(ref: str | bytes, base_dir: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image as RGB, refusing decompression bombs, corrupt files and non-images.

    Args:
        ref (`str | bytes`): a path (relative to `base_dir`, or absolute), a `data:` URI, or encoded image bytes.
        base_dir (`Path`): the catalogue folder.
        max_pixels (`int`, *optional*, defaults to `40_000_000`): the largest `width * height` accepted. The size is
            read from the header before any pixel is decoded.

    Returns:
        `PIL.Image.Image`: an RGB image (transparency is composited onto white).

    Raises:
        `DataError`: naming the image and the reason.
    """
    data, name = _image_bytes(ref, base_dir)
    try:
        image = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except Image.DecompressionBombError as exc:
        raise DataError(f"{name} is too large to decode safely (decompression-bomb guard): {exc}") from None
    except UnidentifiedImageError:
        raise DataError(f"{name} is not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{name} is corrupt: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise DataError(
            f"{name} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(decompression-bomb guard; raise max_pixels only for images you trust)"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{name} is truncated or corrupt: {exc}") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")
