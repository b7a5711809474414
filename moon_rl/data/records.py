"""The records a catalogue is made of: `Product`, `Query` (an inline anchor) and `Pair`.

They are pydantic models with unknown keys forbidden, so a typo in a column name is an error rather than a silently
ignored field. `describe_errors` turns a pydantic `ValidationError` into `(field, reason)` pairs that the loader and
the validator print as `file:line: field 'x': reason (id ...)`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

__all__ = ["ImageRef", "Pair", "Product", "Query", "describe_errors"]


def _check_image_ref(value: Any) -> Any:
    # Without this, a wrong type fails both union members and pydantic reports two unrelated-looking errors.
    if not isinstance(value, str | bytes):
        raise ValueError(f"expected an image path (string) or image bytes, got {_short(value)}")
    return value


ImageRef = Annotated[str | bytes, BeforeValidator(_check_image_ref)]
"""A path relative to the catalogue file's folder (or absolute), a `data:image/...;base64,` URI, or raw bytes."""

NonEmptyStr = Annotated[str, Field(min_length=1)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Product(_Record):
    """One catalogue item.

    Args:
        id (`str`): unique, non-empty identifier; pairs and galleries refer to products by it.
        title (`str`): the product title.
        description (`str`, *optional*): free text.
        category (`str`, *optional*): the product's category.
        attributes (`dict[str, str]`, *optional*): attribute name -> value (e.g. `{"colour": "red"}`).
        images (`list[str | bytes]`, *optional*): image paths relative to the catalogue file, or raw image bytes;
            `images[0]` is the main view.
        reasoning (`str`, *optional*): an SFT reasoning trace, the text that goes inside `<think>...</think>`
            (without the tags).
    """

    id: NonEmptyStr
    title: str
    description: str | None = None
    category: str | None = None
    attributes: dict[str, str] = Field(default_factory=dict)
    images: list[ImageRef] = Field(default_factory=list)
    reasoning: str | None = None


class Query(_Record):
    """An inline anchor that is not a catalogue product: a text query, a query image, or both."""

    text: str | None = None
    image: ImageRef | None = None

    @model_validator(mode="after")
    def _needs_text_or_image(self) -> Query:
        if not self.text and not self.image:
            raise ValueError("an inline query needs a non-empty `text` or `image` (or both)")
        return self


def _anchor_kind(value: Any) -> str:
    return "inline-query" if isinstance(value, dict | Query) else "product-id"


# A callable discriminator validates only the matching member, so a bad inline query reports its own field
# (`anchor.text`) instead of an extra "is not a string" error from the other member of the union.
Anchor = Annotated[
    Annotated[NonEmptyStr, Tag("product-id")] | Annotated[Query, Tag("inline-query")],
    Discriminator(_anchor_kind),
]


class Pair(_Record):
    """A training or evaluation pair: `anchor` should retrieve `positive` (or each of `positives`).

    Args:
        anchor (`str | Query`): a product id, or an inline query `{"text": ..., "image": ...}`.
        positive (`str`, *optional*): the product id the anchor should retrieve.
        positives (`list[str]`, *optional*): several product ids the anchor should retrieve, instead of `positive`
            (give one of the two). Training treats each as a target and never as a negative of the others;
            evaluation counts a hit on any of them.
        relevance (`list[float]`, *optional*): a graded gain per positive (same order, each > 0), e.g. 3 for an
            exact match, 2 for a substitute, 1 for a complement. nDCG uses them; defaults to 1 for every positive.
        negatives (`list[str]`, *optional*): explicit hard-negative product ids (in-batch negatives are always used).
    """

    anchor: Anchor
    positive: NonEmptyStr | None = None
    positives: list[NonEmptyStr] | None = Field(default=None, min_length=1)
    relevance: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] | None = None
    negatives: list[NonEmptyStr] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_way_to_give_positives(self) -> Pair:
        if (self.positive is None) == (self.positives is None):
            raise ValueError("a pair needs `positive` (one product id) or `positives` (a list of them), not both"
                             if self.positive is not None else
                             "a pair needs `positive` (one product id) or `positives` (a list of them)")
        ids = self.positive_ids
        if len(set(ids)) != len(ids):
            raise ValueError(f"`positives` lists a product twice: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
        if self.relevance is not None and len(self.relevance) != len(ids):
            raise ValueError(f"`relevance` needs one gain per positive ({len(ids)}), got {len(self.relevance)}")
        return self

    @property
    def positive_ids(self) -> list[str]:
        """Every product the anchor should retrieve, in the order given (`[positive]` for a single one)."""
        return list(self.positives) if self.positives is not None else [str(self.positive)]

    @property
    def gains(self) -> dict[str, float]:
        """Each positive's graded relevance (`relevance`, else 1.0), in `positive_ids` order."""
        return dict(zip(self.positive_ids, self.relevance or [1.0] * len(self.positive_ids), strict=True))


_UNION_TAGS = {"product-id", "inline-query", "str", "bytes", "constrained-str", "constrained-bytes"}


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(value).__name__} {text}"


def _field_name(loc: tuple[int | str, ...]) -> str | None:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in _UNION_TAGS or item.startswith("function-"):
            continue
        else:
            parts.append(item if not parts else f".{item}")
    return "".join(parts) or None


def describe_errors(exc: ValidationError, model: type[BaseModel]) -> list[tuple[str | None, str]]:
    """Turn a pydantic error into `(field, reason)` pairs with short, user-facing reasons.

    Args:
        exc (`ValidationError`): raised by `model.model_validate(row)`.
        model (`type[BaseModel]`): the model that was validated, used to list the known fields of an unknown key.

    Returns:
        `list[tuple[str | None, str]]`: one entry per distinct problem, e.g. `("images[0]", "expected an image path
        (string) or image bytes, got int 3")`.
    """
    out: list[tuple[str | None, str]] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        field = _field_name(loc)
        kind = err["type"]
        if kind == "missing":
            reason = "required field is missing"
        elif kind == "extra_forbidden":
            owner = Query if loc and loc[0] == "anchor" else model
            reason = f"unknown field (known fields: {', '.join(owner.model_fields)})"
        elif field == "anchor" and kind == "string_type":
            reason = f"expected a product id (string) or an inline query object {{text, image}}, got {_short(err.get('input'))}"
        elif kind == "value_error":
            reason = str(err["msg"]).removeprefix("Value error, ")
        else:
            msg = str(err["msg"])
            reason = f"{msg[:1].lower()}{msg[1:]}, got {_short(err.get('input'))}"
        if (field, reason) not in out:
            out.append((field, reason))
    return out
