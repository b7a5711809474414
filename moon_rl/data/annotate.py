"""Reasoning traces for catalogues that ship none: template traces, the teacher's contradiction test, the copy on disk.

SFT teaches reason mode from each product's `reasoning` trace; a real catalogue has titles, photos and some
attributes, but no traces. `moon-rl annotate` writes a copy of the catalogue whose products carry them, from one of
two sources:

- *template* (this module): `category shirt. colour red. material cotton.`, one `name value.` clause per known value,
  in one order for the whole catalogue. The form is the synthetic catalogue's (`data/synthetic.py`), which the tiny
  model learns in a few hundred steps, and every value is a whole word that chain accuracy, chain negatives and the
  value-token weight find. Values missing from a product's `attributes` are taken from its title when the title names
  exactly one value the attribute takes elsewhere in the catalogue.
- *teacher* (`moon_rl.inference.annotate`): a chat VLM writes the trace; `contradicted` is the test that sends a trace
  back when it names a value the product's known attributes rule out.

`write_catalogue_copy` writes the copy: products (with the traces), pairs, galleries and manifest; image paths
point at the source's files, so nothing is copied and the source is never touched.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from moon_rl.cache import atomic_dir, atomic_open, atomic_write_text
from moon_rl.data.catalogue import MANIFEST, Catalogue
from moon_rl.data.chains import AttributeVocabulary, attribute_vocabulary, named_values
from moon_rl.data.records import Pair, Product
from moon_rl.errors import DataError

__all__ = [
    "TemplateTraces", "catalogue_vocabulary", "check_output_folder", "contradicted", "known_values",
    "template_attribute_order", "template_trace", "template_traces", "title_values", "write_catalogue_copy",
    "write_catalogue_files",
]

CATEGORY = "category"


def known_values(product: Product) -> dict[str, str]:
    """The product's attribute values, its `category` field included (an `attributes` entry of the same name wins)."""
    known = {CATEGORY: product.category} if product.category else {}
    known.update({name: value for name, value in product.attributes.items() if str(value).strip()})
    return known


def catalogue_vocabulary(products: Iterable[Product]) -> AttributeVocabulary:
    """Every value each attribute (and the category) takes over `products`: the words a trace may name."""
    return attribute_vocabulary(known_values(product) for product in products)


def template_attribute_order(products: Iterable[Product]) -> list[str]:
    """The attributes of the catalogue's traces, in their order: the category first, then the attributes the most
    products have (ties in order of first appearance). One order for every product, so that the model learns one form."""
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    for product in products:
        for name in known_values(product):
            counts[name] += 1
            first.setdefault(name, len(first))
    return sorted(counts, key=lambda name: (name != CATEGORY, -counts[name], first[name]))


def title_values(title: str, vocabulary: AttributeVocabulary) -> dict[str, str]:
    """The attribute values a title names, for the attributes it names exactly one value of."""
    return {name: next(iter(found)) for name, found in named_values(title, vocabulary).items() if len(found) == 1}


def template_trace(product: Product, order: Iterable[str], vocabulary: AttributeVocabulary) -> str | None:
    """`category shirt. colour red. material cotton.`: the product's values in `order`, or None if it has none.

    A value the product's own `category` / `attributes` lack comes from its title when the title names exactly one
    value of that attribute (`vocabulary`: the values each attribute takes in the catalogue).
    """
    values = {**title_values(product.title, vocabulary), **known_values(product)}
    clauses = [f"{name} {' '.join(str(values[name]).split())}." for name in order if name in values]
    return " ".join(clauses) or None


@dataclass
class TemplateTraces:
    """Template traces of a catalogue's products and what happened to each product."""

    traces: dict[str, str]  # product id -> new trace
    order: list[str]  # the attributes of the traces, in order
    kept: int  # products that had a trace and kept it
    empty: int  # products with no category, attribute or title value to write about

    def counts(self) -> dict[str, int]:
        return {"annotated": len(self.traces), "kept": self.kept, "no_values": self.empty}


def template_traces(catalogue: Catalogue, *, retrace: bool = False, order: list[str] | None = None) -> TemplateTraces:
    """A template trace for each product without one (every product with `retrace`).

    Args:
        catalogue (`Catalogue`): the source.
        retrace (`bool`, *optional*, defaults to `False`): replace the traces products already have.
        order (`list[str]`, *optional*): the attributes to write, in order (default: `template_attribute_order`).

    Raises:
        `DataError`: if `order` names an attribute no product has.
    """
    products = list(catalogue.products.values())
    vocabulary = catalogue_vocabulary(products)
    if order is not None:
        if unknown := [name for name in order if name not in vocabulary]:
            raise DataError(f"annotate: no product has the attribute(s) {unknown} "
                            f"(the catalogue's: {', '.join(vocabulary) or 'none'})")
    else:
        order = template_attribute_order(products)
    traces: dict[str, str] = {}
    kept = empty = 0
    for product in products:
        if product.reasoning and not retrace:
            kept += 1
        elif (trace := template_trace(product, order, vocabulary)) is not None:
            traces[product.id] = trace
        else:
            empty += 1
    return TemplateTraces(traces, order, kept, empty)


def contradicted(trace: str, known: Mapping[str, str], vocabulary: AttributeVocabulary) -> list[str]:
    """The known attributes that `trace` gets wrong: it names one of the attribute's values, and not the known one.

    A trace that does not mention an attribute does not contradict it (a teacher may leave a value out).
    """
    named = named_values(trace, {name: vocabulary.get(name, {}) for name in known})
    return sorted(name for name, found in named.items() if str(known[name]).strip().lower() not in found)


# ----------------------------------------------------------------------------------------------- the copy on disk
def _data_uri(data: bytes) -> str:
    try:
        kind = (Image.open(io.BytesIO(data)).format or "octet-stream").lower()
    except Exception:  # noqa: BLE001 - an undecodable image is the loader's to report; keep its bytes as they are
        kind = "octet-stream"
    prefix = "image" if kind != "octet-stream" else "application"
    return f"data:{prefix}/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _relocated(ref: str | bytes, source: Path, target: Path) -> str:
    """An image reference valid from `target`: raw bytes as a data URI, a relative path re-rooted at `target`."""
    if isinstance(ref, bytes):
        return _data_uri(ref)
    if ref.startswith("data:") or Path(ref).expanduser().is_absolute():
        return ref
    return os.path.relpath((source / ref).resolve(), target.resolve())


def _product_row(product: Product, trace: str | None, source: Path, target: Path) -> dict[str, Any]:
    row = product.model_dump(exclude_none=True)
    row["images"] = [_relocated(ref, source, target) for ref in product.images]
    if trace is not None:
        row["reasoning"] = trace
    return row


def _pair_row(pair: Pair, source: Path, target: Path) -> dict[str, Any]:
    row = pair.model_dump(exclude_none=True)
    if isinstance(row["anchor"], dict) and "image" in row["anchor"]:
        row["anchor"]["image"] = _relocated(pair.anchor.image, source, target)  # type: ignore[union-attr]
    return row


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Stream `rows` into `path` atomically (a crash never leaves a half-written file)."""
    with atomic_open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def check_output_folder(catalogue: Catalogue, out: Path, overwrite: bool, command: str = "annotate") -> None:
    """Refuse to write into the source catalogue, or over an existing folder without `overwrite` (`command`: the
    moon-rl command the message names)."""
    if out.resolve() == catalogue.base_dir.resolve():
        raise DataError(f"{command}: the output folder {str(out)!r} is the source catalogue's folder; the source is "
                        "never modified: choose another --out")
    if out.exists() and not overwrite:
        raise DataError(f"{command}: {str(out)!r} already exists (pass --overwrite to replace it)")


def write_catalogue_files(catalogue: Catalogue, folder: Path, traces: Mapping[str, str], *,
                          manifest_entry: tuple[str, Mapping[str, Any]], final: Path | None = None,
                          pairs: Mapping[str, Sequence[Pair]] | None = None) -> None:
    """Write a copy of the catalogue's files into the existing `folder` (each file atomically).

    Args:
        catalogue (`Catalogue`): the source.
        folder (`Path`): where the files go.
        traces (`Mapping[str, str]`): product id -> new trace; the other products keep their own.
        manifest_entry (`tuple[str, Mapping]`): a key and value added to the source's `catalogue.json` (what made
            the copy: `annotation`, `mining`), with the source folder.
        final (`Path`, *optional*): where the folder will live (image paths are rewritten relative to it); default
            `folder`. Raw image bytes become data URIs.
        pairs (`Mapping[str, Sequence[Pair]]`, *optional*): the pairs by split to write instead of the source's.
    """
    source, final = catalogue.base_dir, final or folder
    _write_jsonl(folder / "products.jsonl",
                 (_product_row(p, traces.get(p.id), source, final) for p in catalogue.products.values()))
    for split, split_pairs in (pairs if pairs is not None else catalogue.pairs).items():
        _write_jsonl(folder / f"pairs_{split}.jsonl", (_pair_row(pair, source, final) for pair in split_pairs))
    for split, ids in catalogue.galleries.items():
        atomic_write_text(folder / f"gallery_{split}.txt", "".join(f"{pid}\n" for pid in ids))
    key, value = manifest_entry
    manifest = {**catalogue.manifest, key: {**value, "source": str(source.resolve())}}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def write_catalogue_copy(catalogue: Catalogue, out: str | Path, *, command: str,
                         manifest_entry: tuple[str, Mapping[str, Any]], traces: Mapping[str, str] | None = None,
                         pairs: Mapping[str, Sequence[Pair]] | None = None, overwrite: bool = False) -> Path:
    """Write a copy of `catalogue` into `out` with new `traces` and/or `pairs` (see `write_catalogue_files`); the
    folder appears whole or not at all. `command` (`annotate`, `mine`) is the one error messages name.

    Raises:
        `DataError`: if `out` is the source's folder, or exists and `overwrite` is False.
    """
    out = Path(out).expanduser()
    check_output_folder(catalogue, out, overwrite, command)
    with atomic_dir(out) as tmp:
        write_catalogue_files(catalogue, tmp, traces or {}, manifest_entry=manifest_entry, final=out, pairs=pairs)
    return out
