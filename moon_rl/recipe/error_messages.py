"""The one-line messages of recipe problems: `<file or --set>: <what is wrong with which key>`.

Pydantic's errors become "unknown key 'x.y' (did you mean 'x.z'?)", "missing key ..." or "bad value for ...";
a TRL config that refuses to build becomes "invalid 'sft' config: ...". Which file a line names comes from the
recipe's provenance (`moon_rl.recipe.provenance`), never from the text of an exception.
"""

from __future__ import annotations

import typing
from collections.abc import Collection, Mapping, Sequence
from difflib import get_close_matches
from typing import Any

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from moon_rl.recipe.provenance import Origins, lookup_origin
from moon_rl.recipe.schema import Recipe

__all__ = ["dotted", "format_validation_error", "invalid_config_line"]


def dotted(loc: Sequence[Any]) -> str:
    """A key path as messages show it: `("eval", "k", 0)` -> `eval.k[0]`."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _section_class(loc: Sequence[Any]) -> type[BaseModel] | None:
    """The schema class of the mapping at `loc` (e.g. ("model", "heads") -> HeadsSpec)."""
    cls: type[BaseModel] = Recipe
    for part in loc:
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        inner = [a for a in typing.get_args(field.annotation) if a is not type(None)] or [field.annotation]
        if not (isinstance(inner[0], type) and issubclass(inner[0], BaseModel)):
            return None
        cls = inner[0]
    return cls


def _unknown_key_message(loc: tuple[Any, ...], trainer_fields: Mapping[str, Collection[str]]) -> str:
    key, parent = str(loc[-1]), loc[:-1]
    cls = _section_class(parent)
    valid = list(cls.model_fields) if cls is not None else []
    prefix = dotted(parent) + "." if parent else ""
    hint = ""
    if not parent:
        valid.append("extends")
        # A TRL field written at the top level belongs in a trainer section.
        homes = [section for section, fields in trainer_fields.items() if key in fields]
        if homes:
            hint = f" (did you mean {' or '.join(repr(f'{s}.{key}') for s in homes)}?)"
    if not hint:
        close = get_close_matches(key, valid, n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid keys: {', '.join(valid)})"
    return f"unknown key '{prefix}{key}'{hint}"


def format_validation_error(
    error: ErrorDetails, origins: Origins, fallback: str, trainer_fields: Mapping[str, Collection[str]]
) -> str:
    """One line for one pydantic error of `Recipe.model_validate`.

    Args:
        error: one entry of `ValidationError.errors()`.
        origins: where each key was written; the line names the writer of the key (or of its section).
        fallback: the file to name when no writer is recorded (a key the recipe did not set, e.g. a missing one).
        trainer_fields: the field names of each trainer section (`{"sft": ..., "grpo": ...}`), to point a TRL key
            written at the top level to its section.
    """
    loc = tuple(error["loc"])
    source = lookup_origin(origins, loc, fallback)
    if error["type"] == "extra_forbidden":
        return f"{source}: {_unknown_key_message(loc, trainer_fields)}"
    if error["type"] == "missing":
        return f"{source}: missing key '{dotted(loc)}'"
    message = str(error["msg"])
    message = message.removeprefix("Value error, ").replace("Input should be", "should be")
    got = error.get("input")
    shown_got = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{source}: bad value for '{dotted(loc)}': {message}{shown_got}"


def invalid_config_line(source: str, section: str, exc: BaseException) -> str:
    """The line for a trainer section whose TRL config refused to build, the exception's text on one line."""
    return f"{source}: invalid '{section}' config: {' '.join(str(exc).split())}"
