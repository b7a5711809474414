"""`builtin:synthetic`: a deterministic procedural product catalogue in which the image is needed.

Every product has five attributes. Three are *text-visible* (category, material, brand: always named by the title
and description) and two are *image-visible* (colour: named by the text of only ~15% of products; pattern: never).
Products come in families of `1 + lookalikes` that share the text-visible attributes and differ from the family's
first member in exactly one image-visible attribute, so a text-only model cannot tell family members apart while
the full attribute set (which text queries name) always singles out one product.

Images are drawn with PIL: a category silhouette (a mask) filled with the colour and pattern, on a pale background;
each product has two views differing in pose (rotation / flip), scale and background. View 0 is the product image,
view 1 is only ever used as an image query, so a product's own image is never its query.

Same `SyntheticConfig` -> byte-identical files: randomness comes only from seeded `random.Random` / numpy generators,
iteration is in sorted or index order, and nothing records a time.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moon_rl.cache import atomic_dir, cache_root
from moon_rl.data import synthetic_text as words
from moon_rl.data.synthetic_images import draw_view
from moon_rl.data.synthetic_report import SynthReport, text_analysis
from moon_rl.errors import DataError

__all__ = [
    "ATTRIBUTES",
    "VOCABULARY",
    "SyntheticConfig",
    "SynthReport",
    "named_attributes",
    "synthesize",
    "synthetic_cache_dir",
    "vocabulary_corpus",
]

GENERATOR_VERSION = 3  # bump whenever the output for given options changes, so cached catalogues are rebuilt
N_VIEWS = 2
COLOUR_NAMED_RATE = 0.15

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 35), "orange": (240, 130, 20), "yellow": (238, 205, 30), "green": (40, 150, 60),
    "teal": (0, 135, 135), "blue": (35, 75, 205), "purple": (125, 50, 170), "pink": (240, 125, 185),
    "brown": (125, 75, 35), "black": (25, 25, 25), "white": (248, 248, 248), "grey": (130, 130, 130),
}  # fmt: skip
PATTERNS = ("solid", "striped", "dotted", "checked", "zigzag", "diagonal")
CATEGORIES = ("shirt", "dress", "trousers", "shoe", "handbag", "hat", "watch", "lamp", "mug", "umbrella")
MATERIALS = ("cotton", "wool", "leather", "linen", "silk", "denim", "canvas", "suede")
BRANDS = ("zorvik", "lumora", "kestrel", "vantor", "pelino", "mirabo", "quillon", "tavora", "brisko", "nordell")

ATTRIBUTES = ("colour", "pattern", "category", "material", "brand")
TEXT_VISIBLE = ("category", "material", "brand")
IMAGE_VISIBLE = ("colour", "pattern")
VOCABULARY: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS), "pattern": PATTERNS, "category": CATEGORIES, "material": MATERIALS, "brand": BRANDS,
}  # fmt: skip
_WORD_TO_ATTRIBUTE = {value: attr for attr, values in VOCABULARY.items() for value in values}
assert len(_WORD_TO_ATTRIBUTE) == sum(map(len, VOCABULARY.values())), "an attribute word belongs to two attributes"

#: The reasoning traces' fixed form: the text-visible attributes first (copied from the title and description), then
#: the image-visible ones (read from the pixels), one `name value.` clause each. A 2-layer model learns this form in
#: a few hundred steps; the earlier traces (shuffled order, three phrasings per attribute, openers and summaries) it
#: never learned: its greedy chains repeated one phrase and named the right material in 0% of test products
#: (research/platform.md, last section).
TRACE_ORDER = ("category", "material", "brand", "colour", "pattern")
# Draws the earlier trace templates made from the catalogue's random stream (one shuffle of the five attributes, an
# opener, a phrasing per attribute, a summary). The traces no longer draw, but the stream must advance as before so
# that every title, description and query (and so the test split and its queries) stays byte-identical.
_LEGACY_TRACE_CHOICES = (4, 3, 3, 3, 3, 3, 3)


@dataclass(frozen=True)
class SyntheticConfig:
    """Options of the synthetic catalogue.

    Args:
        n_products (`int`, *optional*, defaults to `600`): total products, rounded to whole families.
        seed (`int`, *optional*, defaults to `0`): same seed, same bytes.
        image_size (`int`, *optional*, defaults to `112`): square image side in pixels.
        test_fraction (`float`, *optional*, defaults to `0.2`): fraction of families that go to the test split.
        lookalikes (`int`, *optional*, defaults to `3`): family members besides the first; each differs from the
            first in exactly one of colour / pattern.
        trace_errors (`float`, *optional*, defaults to `0.0`): share of the *training* products whose reasoning
            trace names a wrong value of one of `trace_error_attributes`, as a teacher model's traces do (the
            product's `attributes` keep the true value; test products' traces stay true). `catalogue.json` lists them
            under `trace_errors`. Titles, descriptions, queries, images and the test split do not change.
        trace_error_attributes (`tuple[str, ...]`, *optional*, defaults to `("colour",)`): the image-visible
            attributes a wrong trace may get wrong (one of them per product, drawn uniformly).
        validation (`bool`, *optional*, defaults to `False`): a catalogue for choosing settings without the test
            split. Its families are left out entirely (products, images, pairs), and as many families of the
            training split take their place as the held-out split (`pairs_test.jsonl`, `gallery_test.txt`): train
            and compare on this catalogue, then measure the choice once on the real one.
    """

    n_products: int = 600
    seed: int = 0
    image_size: int = 112
    test_fraction: float = 0.2
    lookalikes: int = 3
    trace_errors: float = 0.0
    trace_error_attributes: tuple[str, ...] = ("colour",)
    validation: bool = False

    def __post_init__(self) -> None:
        limit = len(COLOURS) + len(PATTERNS) - 2
        if self.n_products < 1:
            raise DataError(f"synthetic `n_products` must be >= 1, got {self.n_products}")
        if self.image_size < 32:
            raise DataError(f"synthetic `image_size` must be >= 32 pixels, got {self.image_size}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise DataError(f"synthetic `test_fraction` must be in [0, 1), got {self.test_fraction}")
        if not 0 <= self.lookalikes <= limit:
            raise DataError(f"synthetic `lookalikes` must be in [0, {limit}], got {self.lookalikes}")
        if not 0.0 <= self.trace_errors <= 1.0:
            raise DataError(f"synthetic `trace_errors` must be in [0, 1], got {self.trace_errors}")
        object.__setattr__(self, "trace_error_attributes", tuple(self.trace_error_attributes))
        unknown = sorted(set(self.trace_error_attributes) - set(IMAGE_VISIBLE))
        if unknown or not self.trace_error_attributes:
            raise DataError(f"synthetic `trace_error_attributes` must be a non-empty list of {list(IMAGE_VISIBLE)}, "
                            f"got {list(self.trace_error_attributes)}")

    def key(self) -> str:
        """A folder name that changes whenever the output would."""
        key = (
            f"v{GENERATOR_VERSION}-n{self.n_products}-seed{self.seed}-px{self.image_size}"
            f"-test{self.test_fraction:g}-look{self.lookalikes}"
        )
        if self.trace_errors:  # true traces keep the folder name they always had
            key += f"-errors{self.trace_errors:g}-{'+'.join(self.trace_error_attributes)}"
        if self.validation:
            key += "-validation"
        return key


#: The name before issue 15's naming rule (a recipe section is a `*Spec`, what a component is built with a `*Config`).
SynthOptions = SyntheticConfig


def synthetic_cache_dir(options: SyntheticConfig) -> Path:
    """Where `load_catalogue("builtin:synthetic", synthetic=options)` keeps the generated catalogue."""
    return cache_root() / "synthetic" / options.key()


@dataclass
class _Item:
    id: str
    family: int
    attrs: dict[str, str]
    title: str = ""
    description: str = ""
    reasoning: str = ""
    query: str = ""
    named: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------- text


def named_attributes(text: str) -> dict[str, str]:
    """The attribute values a text names, by attribute (a word that is an attribute value names it)."""
    named: dict[str, str] = {}
    for word in re.findall(r"[a-z]+", text.lower()):
        if (attr := _WORD_TO_ATTRIBUTE.get(word)) is not None and named.setdefault(attr, word) != word:
            raise AssertionError(f"text names two values of {attr!r}: {text!r}")
    return named


def reasoning_trace(attrs: dict[str, str]) -> str:
    """The product's reasoning trace: `category shirt. material wool. brand zorvik. colour red. pattern striped.`"""
    return " ".join(f"{name} {attrs[name]}." for name in TRACE_ORDER)


def _skip_legacy_trace_draws(rng: random.Random) -> None:
    rng.shuffle(list(ATTRIBUTES))
    for n in _LEGACY_TRACE_CHOICES:
        rng.choice(range(n))


DUP_SUFFIX = "-dup"


def _duplicate_listings(items: list[_Item], seed: int) -> list[_Item]:
    """Another seller's listing of each item: new title and description, the item's other photo, not in any gallery.

    They are the anchors of the test split's `product->product` pairs (find the catalogue's listing of a product from
    a duplicate listing). Their texts come from their own random stream, so adding them changed nothing else.
    """
    rng = random.Random(f"{seed}-duplicate-listings")
    duplicates = []
    for item in items:
        dup = _Item(id=f"{item.id}{DUP_SUFFIX}", family=item.family, attrs=dict(item.attrs))
        _write_texts(dup, rng)
        duplicates.append(dup)
    return duplicates


def _write_texts(item: _Item, rng: random.Random) -> None:
    where = rng.choice(("title", "description")) if rng.random() < COLOUR_NAMED_RATE else None
    item.title = words.title(rng, item.attrs, where == "title")
    item.description = words.description(rng, item.attrs, where == "description")
    item.query = words.query(rng, item.attrs)
    _skip_legacy_trace_draws(rng)
    item.reasoning = reasoning_trace(item.attrs)
    item.named = named_attributes(f"{item.title} {item.description}")
    expected = set(TEXT_VISIBLE) | ({"colour"} if where else set())
    # The analysis is only exact if the text names what it was built to name, and correctly.
    assert set(item.named) == expected and all(item.attrs[a] == v for a, v in item.named.items()), item
    assert named_attributes(item.query) == item.attrs and named_attributes(item.reasoning) == item.attrs, item


def vocabulary_corpus(seed: int = 0, n: int = 2000) -> list[str]:
    """Sentences covering every word the synthetic catalogue can produce (to train a tokenizer on).

    The list starts with a sweep (every attribute value and every template, rendered once) and continues with `n`
    sampled titles, descriptions, queries and reasoning traces. Deterministic for a given `seed`; no images.
    """
    sweep = [f"{attr}: {' '.join(values)}" for attr, values in VOCABULARY.items()]
    sweep += [" ".join(words.ADJECTIVES), " ".join(words.USES), " ".join(words.SEASONS)]
    templates = list(words.TEMPLATES)
    rng = random.Random(f"vocabulary:{seed}")
    for index, template in enumerate(t for t in templates if t):
        attrs = {attr: values[index % len(values)] for attr, values in VOCABULARY.items()}
        sweep.append(template.format(**words.fill(rng, attrs)))
    sampled: list[str] = []
    for index in range(n):
        attrs = {attr: rng.choice(values) for attr, values in VOCABULARY.items()}
        kind = index % 4
        if kind == 0:
            sampled.append(words.title(rng, attrs, rng.random() < COLOUR_NAMED_RATE))
        elif kind == 1:
            sampled.append(words.description(rng, attrs, rng.random() < COLOUR_NAMED_RATE))
        elif kind == 2:
            sampled.append(words.query(rng, attrs))
        else:
            sampled.append(reasoning_trace(attrs))
    return sweep + sampled


# ------------------------------------------------------------------------------------------------------ structure


def _family_members(
    rng: random.Random, options: SyntheticConfig, used: set[tuple[str, ...]], triple: tuple[str, str, str]
) -> list[dict[str, str]]:
    """A family: a base (colour, pattern), then look-alikes each changing exactly one of them."""
    combos = [(c, p) for c in COLOURS for p in PATTERNS if (c, p, *triple) not in used]
    if len(combos) < 1 + options.lookalikes:
        raise DataError("synthetic catalogue too large for the vocabulary; lower `n_products` or `lookalikes`")
    base = rng.choice(combos)
    members = [base]
    for _ in range(options.lookalikes):
        kinds = ["colour", "pattern"]
        rng.shuffle(kinds)
        for kind in kinds:
            candidates = [
                (c, p) for c, p in combos
                if (c, p) not in members and ((kind == "colour" and p == base[1]) or (kind == "pattern" and c == base[0]))
            ]  # fmt: skip
            if candidates:
                members.append(rng.choice(candidates))
                break
        else:
            raise DataError("synthetic catalogue: not enough free colour/pattern combinations for `lookalikes`")
    for colour, pattern in members:
        used.add((colour, pattern, *triple))
    category, material, brand = triple
    return [dict(colour=c, pattern=p, category=category, material=material, brand=brand) for c, p in members]


def _plan(options: SyntheticConfig) -> tuple[list[list[_Item]], list[int]]:
    """Families of items with texts, and the (sorted) indices of the test families."""
    rng = random.Random(f"synthetic:{options.seed}")
    family_size = 1 + options.lookalikes
    n_families = max(1, round(options.n_products / family_size))
    n_test = 0
    if options.test_fraction > 0 and n_families >= 2:
        n_test = min(n_families - 1, max(1, round(n_families * options.test_fraction)))
    triples = list(itertools.product(CATEGORIES, MATERIALS, BRANDS))
    rng.shuffle(triples)
    width = max(4, len(str(n_families * family_size - 1)))
    used: set[tuple[str, ...]] = set()
    families: list[list[_Item]] = []
    for index in range(n_families):
        # Distinct triples while they last, so families of the same text are rare; reuse keeps tuples unique.
        members = _family_members(rng, options, used, triples[index % len(triples)])
        items = []
        for attrs in members:
            item = _Item(f"p{len(families) * family_size + len(items):0{width}d}", index, attrs)
            _write_texts(item, rng)
            items.append(item)
        families.append(items)
    test = sorted(rng.sample(range(n_families), n_test))
    if options.validation:
        return _validation_plan(families, test, options.seed)
    return families, test


def _validation_plan(families: list[list[_Item]], test: list[int], seed: int) -> tuple[list[list[_Item]], list[int]]:
    """Drop the test families; as many training families, drawn from their own stream, become the held-out split.

    Every kept item keeps its id, attributes and texts (the ids have gaps where the test families were); families
    are renumbered so that `_Item.family` indexes the returned list.
    """
    test_set = set(test)
    kept = [family for index, family in enumerate(families) if index not in test_set]
    if len(kept) < 2 * len(test):
        raise DataError(f"synthetic `validation`: {len(kept)} training families cannot give up {len(test)} for "
                        "validation and keep as many to train on; lower `test_fraction`")
    for index, family in enumerate(kept):
        for item in family:
            item.family = index
    validation = sorted(random.Random(f"synthetic:{seed}:validation").sample(range(len(kept)), len(test)))
    return kept, validation


def _manifest_options(options: SyntheticConfig) -> dict[str, Any]:
    """The options as `catalogue.json` records them; without trace errors or validation, as before they existed."""
    recorded = asdict(options)
    if not options.trace_errors:
        del recorded["trace_errors"], recorded["trace_error_attributes"]
    if not options.validation:
        del recorded["validation"]
    return recorded


def _write_trace_errors(train_items: list[_Item], options: SyntheticConfig) -> dict[str, dict[str, str]]:
    """Rewrite a `trace_errors` share of the training items' traces with one wrong image-visible value.

    Its own random stream: every other byte of the catalogue is what it is without errors. Returns, per rewritten
    item, the attribute, the true value and the value the trace now names.
    """
    rng = random.Random(f"synthetic:{options.seed}:trace-errors")
    chosen = sorted(rng.sample(range(len(train_items)), round(len(train_items) * options.trace_errors)))
    errors = {}
    for index in chosen:
        item = train_items[index]
        attr = rng.choice(options.trace_error_attributes)
        wrong = rng.choice([value for value in VOCABULARY[attr] if value != item.attrs[attr]])
        item.reasoning = reasoning_trace({**item.attrs, attr: wrong})
        errors[item.id] = {"attribute": attr, "true": item.attrs[attr], "trace": wrong}
    return errors


def _differs_in_one(a: dict[str, str], b: dict[str, str]) -> bool:
    return sum(a[k] != b[k] for k in ATTRIBUTES) == 1


# --------------------------------------------------------------------------------------------------------- images


def _draw_item(item: _Item, options: SyntheticConfig, index: int, images: Path) -> None:
    rng = random.Random(f"image:{options.seed}:{item.id}")
    np_rng = np.random.default_rng([options.seed, index])
    for view in range(N_VIEWS):
        image = draw_view(item.attrs["category"], COLOURS[item.attrs["colour"]], item.attrs["pattern"],
                          options.image_size, rng, np_rng)
        image.save(images / f"{item.id}_v{view}.png", format="PNG", compress_level=6)


# ---------------------------------------------------------------------------------------------------------- write


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def _pairs(items: list[_Item], families: list[list[_Item]], negatives: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for item in items:
        text: dict[str, Any] = {"anchor": {"text": item.query}, "positive": item.id}
        view: dict[str, Any] = {"anchor": {"image": f"images/{item.id}_v1.png"}, "positive": item.id}
        if negatives:
            hard = [m.id for m in families[item.family] if m is not item and _differs_in_one(m.attrs, item.attrs)]
            text["negatives"] = view["negatives"] = hard
        rows += [text, view]
    return rows


def synthesize(out: Path, options: SyntheticConfig | None = None, replace: bool = True,
               overwrite: bool = False) -> SynthReport:
    """Write the synthetic catalogue folder `out` atomically (replacing a catalogue there, unless `replace=False`).

    Writes `products.jsonl`, `images/<id>_v<view>.png`, `pairs_train.jsonl`, `pairs_test.jsonl`, `gallery_test.txt`
    and `catalogue.json` (options, vocabulary, families, counts and the text-only analysis).

    Args:
        out (`Path`): the folder to create.
        options (`SyntheticConfig`, *optional*): defaults to `SyntheticConfig()`.
        overwrite (`bool`, *optional*, defaults to `False`): also replace a folder that holds something other than a
            synthetic catalogue (no `catalogue.json`); without it that is a `DataError`, and nothing is deleted.

    Returns:
        `SynthReport`: counts and the text-only analysis of the test split.
    """
    options = options or SyntheticConfig()
    out = Path(out)
    # The catalogue replaces the folder whole: never a folder of the user's own files without being told to.
    if not overwrite and out.exists() and (not out.is_dir() or (any(out.iterdir()) and
                                                                not (out / "catalogue.json").is_file())):
        raise DataError(f"{out} exists and is not a synthetic catalogue (no catalogue.json): writing the catalogue "
                        "would delete what it holds; choose another folder, or pass --overwrite (overwrite=True) "
                        "to replace it")
    start = time.perf_counter()
    families, test_families = _plan(options)
    items = [item for family in families for item in family]
    test_set = set(test_families)
    train_items = [item for item in items if item.family not in test_set]
    test_items = [item for item in items if item.family in test_set]
    analysis = text_analysis(test_items)
    if not analysis["positive_unique"]:
        raise AssertionError("synthetic catalogue: a test query's attributes match more than its positive")
    pairs = {"train": _pairs(train_items, families, True), "test": _pairs(test_items, families, False)}
    duplicates = _duplicate_listings(test_items, options.seed)
    trace_errors = _write_trace_errors(train_items, options) if options.trace_errors else {}
    pairs["test"] += [{"anchor": dup.id, "positive": item.id} for dup, item in zip(duplicates, test_items, strict=True)]
    with atomic_dir(out, replace=replace) as tmp:
        images = tmp / "images"
        images.mkdir()
        for item in items:
            # An item's draws are seeded by its place in the full catalogue (its id's number), so that a validation
            # catalogue, which leaves the test families out, draws every kept item's photos as the full one does.
            _draw_item(item, options, int(item.id[1:]), images)
        _jsonl(tmp / "products.jsonl", [
            {"id": item.id, "title": item.title, "description": item.description,
             "category": item.attrs["category"], "attributes": {a: item.attrs[a] for a in ATTRIBUTES},
             "images": [f"images/{item.id}_v0.png"], "reasoning": item.reasoning}
            for item in items
        ] + [
            {"id": dup.id, "title": dup.title, "description": dup.description, "category": dup.attrs["category"],
             "attributes": {a: dup.attrs[a] for a in ATTRIBUTES}, "images": [f"images/{item.id}_v1.png"],
             "reasoning": dup.reasoning}
            for dup, item in zip(duplicates, test_items, strict=True)
        ])  # fmt: skip
        for split, rows in pairs.items():
            _jsonl(tmp / f"pairs_{split}.jsonl", rows)
        (tmp / "gallery_test.txt").write_text("".join(f"{item.id}\n" for item in test_items), encoding="utf-8")
        manifest = {
            "format": "moon-rl-catalogue",
            "generator": "builtin:synthetic",
            "generator_version": GENERATOR_VERSION,
            "options": _manifest_options(options),
            "attributes": {attr: list(values) for attr, values in VOCABULARY.items()},
            "text_visible": list(TEXT_VISIBLE),
            "image_visible": list(IMAGE_VISIBLE),
            "views": N_VIEWS,
            "families": [[item.id for item in family] for family in families],
            "test_families": test_families,
            "counts": {"products": len(items), "families": len(families), "train_products": len(train_items),
                       "test_products": len(test_items), "duplicate_listings": len(duplicates), "pairs": {s: len(r) for s, r in pairs.items()}},
            "text_only_analysis": analysis,
        }  # fmt: skip
        if trace_errors:
            manifest["trace_errors"] = trace_errors
        (tmp / "catalogue.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return SynthReport(
        out=out,
        n_products=len(items),
        n_families=len(families),
        n_train_products=len(train_items),
        n_test_products=len(test_items),
        n_pairs={split: len(rows) for split, rows in pairs.items()},
        chance_r1=analysis["chance_r1"],
        text_ceiling_r1=analysis["text_ceiling_r1"],
        ambiguous_fraction=analysis["ambiguous_fraction"],
        seconds=time.perf_counter() - start,
        validation=options.validation,
        n_views=N_VIEWS,
    )
