"""Loading a recipe: read the YAML files of the `extends` chain, merge them, apply `--set` overrides, resolve input
paths, validate, and remember where every key was written.

`load_recipe(path, overrides)` follows the recipe's `extends:` chain (deep merge: mappings merge, lists and scalars
replace), applies `--set a.b=c` overrides and validates everything at once. Every problem is reported in one
`RecipeError`, one line each, naming the file that wrote the key (or `--set`), the full key path and, for a misspelt
key, the closest valid one.

Paths: `data.catalogue` and `path/to/file.py:fn` reward names are inputs shipped with recipes, so a relative value
resolves against the folder of the file that set it (the CWD for `--set`). `output_dir` and `grpo.init_from` are run
outputs and stay relative to the CWD.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from moon_rl.errors import RecipeError
from moon_rl.recipe.error_messages import format_validation_error
from moon_rl.recipe.provenance import OVERRIDE_SOURCE, Origins, Provenance, lookup_origin
from moon_rl.recipe.schema import SECTIONS, Recipe
from moon_rl.recipe.yaml_dialect import RecipeLoader

__all__ = ["load_recipe", "parse_override", "validate_recipe"]


# ---- Reading: YAML files and the extends chain


def _display(path: Path) -> str:
    """A file as messages show it: relative to the CWD when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _read_yaml(path: Path, shown: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{shown}: cannot read recipe: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        bad = exc.object[exc.start : exc.start + 1].hex()
        raise RecipeError(f"{shown}:{line}: not valid UTF-8 (byte 0x{bad}); save the recipe as UTF-8") from exc
    try:
        data = yaml.load(text, Loader=RecipeLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{shown}:{mark.line + 1}" if mark is not None else shown
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{where}: invalid YAML: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{shown}: a recipe is a mapping of sections (model:, data:, ...), got {type(data).__name__}")
    return data


def _read_chain(path: Path) -> list[tuple[Path, str, dict[str, Any]]]:
    """The recipe and the files it extends, base first, as (path, shown name, data without `extends`)."""
    chain: list[tuple[Path, str, dict[str, Any]]] = []
    current = path.expanduser().resolve()
    shown = _display(current)
    if not current.is_file():
        raise RecipeError(f"{shown}: recipe file not found")
    while True:
        if any(current == seen for seen, _, _ in chain):
            cycle = " -> ".join([name for _, name, _ in chain] + [shown])
            raise RecipeError(f"{chain[-1][1]}: 'extends' cycle: {cycle}")
        data = _read_yaml(current, shown)
        parent = data.pop("extends", None)
        chain.append((current, shown, data))
        if parent is None:
            return chain[::-1]
        if not isinstance(parent, str) or not parent:
            raise RecipeError(f"{shown}: 'extends' must be the path of one recipe file, got {parent!r}")
        candidate = (current.parent / Path(parent).expanduser()).resolve()
        if not candidate.is_file():
            raise RecipeError(f"{shown}: 'extends' file {parent!r} not found (looked for {candidate})")
        current, shown = candidate, _display(candidate)


# ---- Merging with provenance, overrides, paths


def _set_origin(origins: Origins, prefix: tuple[str, ...], value: Any, source: str) -> None:
    """Record that `source` wrote `value` at `prefix` (and everything inside it), forgetting older writers."""
    for key in [k for k in origins if k[: len(prefix)] == prefix]:
        del origins[key]
    origins[prefix] = source
    if isinstance(value, dict):
        for key, inner in value.items():
            _set_origin(origins, (*prefix, str(key)), inner, source)


def _merge(dst: dict[str, Any], src: dict[str, Any], origins: Origins, source: str, prefix: tuple[str, ...]) -> None:
    """Deep-merge `src` into `dst`: mappings merge, lists and scalars replace."""
    for key, value in src.items():
        path = (*prefix, str(key))
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            origins[path] = source
            _merge(dst[key], value, origins, source, path)
        else:
            dst[key] = copy.deepcopy(value)
            _set_origin(origins, path, value, source)


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """Parse one `--set` override `a.b.c=value` into (key path, typed value).

    Values follow the recipe YAML rules: `true`/`false` -> bool, `3` -> int, `1e-4` -> float, `null` -> None,
    `[1, 2]` -> list, `{a: 1}` -> dict, anything else a string (`a,b` stays the string "a,b").

    Raises:
        RecipeError: not of the form KEY=VALUE, or the value is not valid YAML.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(
            f"{OVERRIDE_SOURCE}: expected KEY=VALUE with a dotted KEY (e.g. sft.learning_rate=1e-4), got {text!r}"
        )
    try:
        value = yaml.load(raw.strip(), Loader=RecipeLoader) if raw.strip() else ""  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise RecipeError(f"{OVERRIDE_SOURCE}: value of {key!r} is not valid YAML ({raw!r}): {exc}") from exc
    return tuple(key.split(".")), value


def _apply_override(data: dict[str, Any], origins: Origins, text: str) -> None:
    path, value = parse_override(text)
    if path[0] == "extends":
        raise RecipeError(f"{OVERRIDE_SOURCE}: 'extends' cannot be overridden; point the recipe's extends: at the file")
    node = data
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:  # absent or null (e.g. `lora: null`): the override starts a fresh section
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise RecipeError(
                f"{OVERRIDE_SOURCE}: cannot set '{'.'.join(path)}': '{where}' is {type(child).__name__} {child!r}, "
                "not a section"
            )
        node = child
    node[path[-1]] = value
    _set_origin(origins, path, value, OVERRIDE_SOURCE)


_REWARD_FILE_RE = re.compile(r"^(?P<file>.+\.py):(?P<fn>[A-Za-z_][\w.]*)$")


def _resolve_paths(data: dict[str, Any], origins: Origins, folders: dict[str, Path]) -> None:
    """Make relative input paths absolute against the folder of the file that wrote them (CWD for `--set`)."""

    def absolute(value: str, key: tuple[str, ...]) -> str:
        path = Path(value).expanduser()
        if path.is_absolute():
            return str(path)
        folder = folders.get(lookup_origin(origins, key, OVERRIDE_SOURCE), Path.cwd())
        return os.path.normpath(folder / path)

    section = data.get("data")
    if isinstance(section, dict) and isinstance(section.get("catalogue"), str):
        catalogue = section["catalogue"]
        if catalogue and not catalogue.startswith(("builtin:", "hf:")):
            section["catalogue"] = absolute(catalogue, ("data", "catalogue"))
    grpo = data.get("grpo")
    rewards = grpo.get("rewards") if isinstance(grpo, dict) else None
    for entry in rewards if isinstance(rewards, list) else []:
        match = _REWARD_FILE_RE.match(entry.get("name", "")) if isinstance(entry, dict) else None
        if match and isinstance(entry["name"], str):
            entry["name"] = f"{absolute(match['file'], ('grpo', 'rewards'))}:{match['fn']}"


def _load(path: str | os.PathLike[str], overrides: Sequence[str]) -> tuple[Recipe | None, list[str]]:
    """Read, merge, override and validate; fatal problems (missing file, bad YAML, bad override) raise."""
    chain = _read_chain(Path(path))
    data: dict[str, Any] = {}
    origins: Origins = {}
    folders: dict[str, Path] = {OVERRIDE_SOURCE: Path.cwd()}
    for file, shown, content in chain:
        folders[shown] = file.parent
        _merge(data, content, origins, shown, ())
    for text in overrides:
        _apply_override(data, origins, text)
    top_file, top_shown = chain[-1][0], chain[-1][1]
    data.setdefault("output_dir", f"runs/{top_file.stem}")
    for section in SECTIONS:
        if section in data and data[section] is None:  # `sft:` with every line commented out: all defaults
            data[section] = {}
    _resolve_paths(data, origins, folders)
    provenance = Provenance(origins, tuple(shown for _, shown, _ in chain), tuple(overrides))
    return _validate(data, provenance, top_shown)


def _validate(data: dict[str, Any], provenance: Provenance, fallback: str) -> tuple[Recipe | None, list[str]]:
    """Validate merged recipe data; problems come one line each, in section order."""
    # Imported here, not with the package: it imports trl (seconds), which only loading a recipe needs.
    from moon_rl.recipe.trainer_configs import section_key_problems, trainer_fields

    origins = provenance.origins
    found: list[tuple[str, str]] = []  # (top-level key, line)
    found += [
        (str(key), f"{fallback}: top-level key {key!r} is not a string") for key in data if not isinstance(key, str)
    ]
    found += section_key_problems(data, origins, fallback)  # the sft / grpo keys: the schema leaves them to TRL's
    recipe = None
    try:
        recipe = Recipe.model_validate(data, context={"provenance": provenance})
    except ValidationError as exc:
        fields = trainer_fields()
        for error in exc.errors():
            line = format_validation_error(error, origins, fallback, fields)
            found.append((str(error["loc"][0]) if error["loc"] else "", line))
    order = list(Recipe.model_fields)
    found.sort(key=lambda item: order.index(item[0]) if item[0] in order else len(order))
    problems = list(dict.fromkeys(line for _, line in found))
    return (None if problems else recipe), problems


def load_recipe(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe file: follow `extends`, apply `--set` overrides, validate.

    Args:
        path: the recipe YAML file.
        overrides: `KEY=VALUE` strings (`sft.learning_rate=1e-4`, `stages=[sft, grpo]`), applied in order after the
            `extends` chain is merged.

    Raises:
        RecipeError: every problem of the recipe, one line each (file or `--set`, key path, what was expected).
    """
    recipe, problems = _load(path, overrides)
    if problems or recipe is None:
        raise RecipeError("\n".join(problems))
    return recipe


def validate_recipe(
    path: str | os.PathLike[str], overrides: Sequence[str] = (), device_checks: bool = True
) -> list[str]:
    """All problems of a recipe (schema, then `Recipe.check()`), one line each; empty when it is ready to run."""
    try:
        recipe, problems = _load(path, overrides)
    except RecipeError as exc:
        return str(exc).splitlines()
    if problems or recipe is None:
        return problems
    return recipe.check(device_checks=device_checks)
