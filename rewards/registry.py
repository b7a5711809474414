"""The reward registry: names in a recipe's `grpo.rewards` become reward callables.

A reward follows TRL's contract, `fn(completions, **kwargs) -> list[float | None]`. A recipe entry
`{name, weight, args}` names it in one of four forms, tried in this order:

1. a registered name (`@reward("retrieval_rank")`; the built-ins register on `import moon_rl.rewards`),
2. an entry point in group `moon_rl.rewards` (an installed package's `pyproject.toml`),
3. `package.module:fn`, imported with `importlib`,
4. `path/to/file.py:fn`, relative to `base_dir` (the recipe loader makes it absolute against the recipe's folder).

Nothing is built until a recipe selects it. `args` become keyword arguments: a function is bound with
`functools.partial`, a class is instantiated (`cls(**args)`), so a bound reward stays picklable. Every problem is a
`RewardError` (a `RecipeError`, so the CLI reports it in one line without a traceback).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from moon_rl.errors import RecipeError

__all__ = [
    "ENTRY_POINT_GROUP",
    "RewardEntry",
    "RewardError",
    "RewardFunc",
    "available_rewards",
    "build_rewards",
    "resolve_reward",
    "reward",
]

#: Entry point group an installed package registers its rewards under.
ENTRY_POINT_GROUP = "moon_rl.rewards"
#: Added to the error of a reward module that failed on `import rewards`: moon-rl's reward package before issue 15
#: (plugins were written `from rewards import reward`). Now nothing named `rewards` is installed, or another
#: distribution of that name answers.
OLD_IMPORT_HINT = (
    ". If this is moon-rl's reward package: it is `moon_rl.rewards`, no longer `rewards`; write "
    "`from moon_rl.rewards import reward` (and name modules `moon_rl.rewards.<module>:<fn>` in a recipe)."
)
#: The accepted forms of a reward name, quoted by every "unknown reward" message.
ACCEPTED_FORMS = (
    f"a registered name, an entry point in group '{ENTRY_POINT_GROUP}', 'package.module:fn' or 'path/to/file.py:fn'"
)
#: Keyword arguments the trainers pass on every call. Binding one in `args` would be silently overridden by the
#: trainer's value, so it is refused.
RESERVED_ARGS = frozenset(
    {
        "prompts",
        "completions",
        "completion_ids",
        "trainer_state",
        "log_metric",
        "log_extra",
        "environments",
        "embeddings",
        "candidates",
        "positive_index",
        "candidate_mask",
        "product_ids",
        "truncated",
    }
)

RewardFunc = Callable[..., list[float | None]]
_R = TypeVar("_R", bound=Callable[..., Any])

# name -> function or class, as registered; classes are instantiated only when a recipe selects them.
_REGISTRY: dict[str, Callable[..., Any]] = {}


class RewardError(RecipeError):
    """A reward name, its arguments or a registration is invalid."""


def reward(name: str) -> Callable[[_R], _R]:
    r"""
    Register a reward function or class under `name`.

    A function is the reward itself; a class is instantiated with the recipe's `args` and its instances are the
    reward (use a class when the reward has parameters, so that it stays picklable). Registering a different object
    under a taken name raises; re-registering the same function (a module reloaded) replaces it.

    Args:
        name (`str`):
            Name recipes use, e.g. `"retrieval_rank"`. Must not contain `:`, which marks module and file paths.

    Returns:
        `Callable`: A decorator that registers its argument and returns it unchanged.

    Example:
    ```python
    >>> from moon_rl.rewards import reward
    >>> @reward("doc_example_constant")
    ... def constant(completions, **kwargs):
    ...     return [1.0] * len(completions)
    >>> constant(["a", "b"])
    [1.0, 1.0]

    ```
    """
    if not isinstance(name, str) or not name.strip() or ":" in name:
        raise RewardError(f"Reward name must be a non-empty string without ':', got {name!r}.")

    def decorator(obj: _R) -> _R:
        if not callable(obj):
            raise RewardError(f"@reward({name!r}) must decorate a function or class, got {obj!r}.")
        existing = _REGISTRY.get(name)
        if existing is not None and _qualified_name(existing) != _qualified_name(obj):
            raise RewardError(
                f"Reward name {name!r} is already registered by {_qualified_name(existing)}; "
                f"{_qualified_name(obj)} must use another name."
            )
        _REGISTRY[name] = obj
        return obj

    return decorator


def available_rewards() -> list[str]:
    """
    Names that resolve without a path: the registered rewards and the installed entry points, sorted.

    Returns:
        `list[str]`: The names.

    Example:
    ```python
    >>> from moon_rl.rewards import available_rewards
    >>> "retrieval_rank" in available_rewards()
    True

    ```
    """
    return sorted(set(_REGISTRY) | set(_entry_points()))


def resolve_reward(name: str, args: Mapping[str, Any] | None = None, *, base_dir: Path | None = None) -> RewardFunc:
    r"""
    Resolve a reward name to a callable with `args` bound.

    Args:
        name (`str`):
            A registered name, an entry point in group `moon_rl.rewards`, `package.module:fn` or `path/to/file.py:fn`
            (tried in that order). `fn` may be a function or a class.
        args (`Mapping[str, Any]`, *optional*):
            Keyword arguments: bound with `functools.partial` for a function, passed to the constructor for a class.
            Keys must be explicitly named parameters of the function (other than the ones trainers pass on every
            call, such as `completions`) or of the class's `__init__`.
        base_dir (`Path`, *optional*):
            Folder a relative `path/to/file.py` resolves against; defaults to the current directory.

    Returns:
        `Callable`: The reward, picklable when its function or class is importable. Its `__name__` is the registered
        or entry point name, or `fn` for the path forms. (TRL logs a `functools.partial` by the wrapped function's
        `__name__`, which is the same for the built-ins.)

    Raises:
        `RewardError`: On an unknown name, a missing file, module or function, an import error, an unknown argument,
        a reward that does not take `**kwargs`, or a constructor that rejects its arguments.

    Example:
    ```python
    >>> from moon_rl.rewards import resolve_reward
    >>> margin = resolve_reward("retrieval_margin", {"temperature": 0.1})
    >>> margin.__name__, margin.temperature
    ('retrieval_margin', 0.1)

    ```
    """
    if not isinstance(name, str) or not name.strip():
        raise RewardError(f"A reward name must be a non-empty string, got {name!r}; use {ACCEPTED_FORMS}.")
    if args is not None and not isinstance(args, Mapping):
        raise RewardError(f"Arguments of reward {name!r} must be a mapping of keyword arguments, got {args!r}.")
    obj, display = _lookup(name, base_dir)
    return _bind(obj, dict(args or {}), display)


@dataclasses.dataclass(frozen=True)
class RewardEntry:
    r"""
    One built reward of a recipe: the name its metrics are logged under, the callable, and its weight.

    `name` is also `fn.__name__` and the name TRL's `get_callable_name(fn)` gives, so a trainer that wraps `fn` under
    `name` and one that hands `fn` to TRL as is both log `rewards/<name>/mean`, and no two entries share a key.

    Args:
        name (`str`):
            Unique among the entries `build_rewards` returned together.
        fn (`Callable`):
            The reward, with its recipe `args` bound.
        weight (`float`):
            Its weight in the step's total reward.
    """

    name: str
    fn: RewardFunc
    weight: float


def build_rewards(entries: Sequence[Mapping[str, Any]], *, base_dir: Path | None = None) -> list[RewardEntry]:
    r"""
    Build the rewards of a recipe's `grpo.rewards` list, reporting every bad entry at once.

    Each entry is named as TRL would log its callable (the registered or entry point name, or `fn` for the path
    forms). Two entries with the same name (say two `length` budgets) become `length` and `length_2` (`_3`, ... then,
    skipping any suffix another entry already uses), and the callable is renamed to match, so their logs stay apart.

    Args:
        entries (`Sequence[Mapping[str, Any]]`):
            Entries `{name, weight, args}`; `weight` defaults to `1.0`, `args` to `{}`.
        base_dir (`Path`, *optional*):
            Folder relative `path/to/file.py:fn` names resolve against; defaults to the current directory.

    Returns:
        `list[RewardEntry]`: One entry per recipe entry, in order, with distinct names equal to their `fn.__name__`
        (a callable that cannot carry the name, such as a partial of a differently named function, is wrapped).

    Raises:
        `RewardError`: One line per bad entry.

    Example:
    ```python
    >>> from moon_rl.rewards import build_rewards
    >>> built = build_rewards([{"name": "retrieval_rank"}, {"name": "length", "weight": 0.5, "args": {"budget": 32}},
    ...                        {"name": "length", "args": {"budget": 64}}])
    >>> [(entry.name, entry.fn.__name__, entry.weight) for entry in built]
    [('retrieval_rank', 'retrieval_rank', 1.0), ('length', 'length', 0.5), ('length_2', 'length_2', 1.0)]

    ```
    """
    resolved: list[tuple[str, RewardFunc, float]] = []
    problems: list[str] = []
    for i, entry in enumerate(entries):
        where = f"rewards[{i}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            problems.append(f"{where}: expected a mapping with a string 'name', got {entry!r}.")
            continue
        where = f"rewards[{i}] ({entry['name']})"
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            problems.append(f"{where}: weight must be a finite number, got {weight!r}.")
            continue
        try:
            fn = resolve_reward(entry["name"], entry.get("args"), base_dir=base_dir)
        except RewardError as exc:
            problems.append(f"{where}: {exc}")
            continue
        resolved.append((getattr(fn, "__name__", None) or entry["name"], fn, float(weight)))
    if problems:
        raise RewardError("\n".join(problems))
    names = _unique_names([label for label, _, _ in resolved])
    built: list[RewardEntry] = []
    for name, (_, fn, weight) in zip(names, resolved, strict=True):
        built.append(RewardEntry(name, _named(fn, name, [entry.fn for entry in built]), weight))
    return built


def _unique_names(labels: list[str]) -> list[str]:
    """`labels` with repeats suffixed `_2`, `_3`, ...; a suffix never takes a name another label already has."""
    taken = set(labels)
    seen: set[str] = set()
    out: list[str] = []
    for label in labels:
        name, k = label, 1
        # `length, length, length_2`: the second `length` becomes `length_3`, not the third entry's `length_2`.
        while name in seen or (name != label and name in taken):
            k += 1
            name = f"{label}_{k}"
        seen.add(name)
        out.append(name)
    return out


def _trl_name(fn: Any) -> str:
    # trl.trainer.utils.get_callable_name, copied so that `import moon_rl.rewards` stays free of trl: a partial is
    # logged by the wrapped function's name, anything else by its `__name__`, else its class's.
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def _named(fn: RewardFunc, name: str, others: list[RewardFunc]) -> RewardFunc:
    """`fn`, renamed so that both `__name__` and the name TRL logs it under are `name`; wrapped when it cannot be."""
    if not isinstance(fn, functools.partial) and all(fn is not other for other in others):
        _set_name(fn, name)
    if getattr(fn, "__name__", None) == name and _trl_name(fn) == name and all(fn is not other for other in others):
        return fn
    # A partial whose function has another name (a duplicate, or `@reward("alias")` on `def f`), an object whose name
    # is read-only, or one object returned for two entries (renaming it would mislabel the other).
    return _RenamedReward(fn, name)


class _RenamedReward:
    """A reward under another name; a module-level class, so that it pickles like the reward it wraps."""

    def __init__(self, fn: RewardFunc, name: str) -> None:
        self.fn = fn
        self.__name__ = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fn!r}, {self.__name__!r})"

    def __call__(self, *args: Any, **kwargs: Any) -> list[float | None]:
        return self.fn(*args, **kwargs)


# --- lookup ---------------------------------------------------------------------------------------------------------


def _lookup(name: str, base_dir: Path | None) -> tuple[Callable[..., Any], str]:
    """The registered object for `name` and the name to log it under."""
    if name in _REGISTRY:
        return _REGISTRY[name], name
    entry_points = _entry_points()
    if name in entry_points:
        return _load_entry_point(entry_points[name]), name
    target, sep, attr = name.rpartition(":")
    if not sep or not target or not attr:
        raise RewardError(_unknown_message(name))
    if target.endswith(".py"):
        return _get_attr(_load_file(target, name, base_dir), attr, f"file {target!r}"), attr.rsplit(".", 1)[-1]
    try:
        module = importlib.import_module(target)
    except ImportError as exc:
        hint = _old_import_hint(exc)
        raise RewardError(f"Cannot import module {target!r} for reward {name!r}: {exc}{hint}") from exc
    return _get_attr(module, attr, f"module {target!r}"), attr.rsplit(".", 1)[-1]


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    # Looked up on every call (not cached) so a package installed mid-session, or a test's monkeypatch, is seen.
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _load_entry_point(entry_point: importlib.metadata.EntryPoint) -> Callable[..., Any]:
    try:
        obj = entry_point.load()
    except (ImportError, AttributeError) as exc:
        hint = _old_import_hint(exc)
        raise RewardError(
            f"Entry point {entry_point.name!r} ({entry_point.value!r}, group {ENTRY_POINT_GROUP!r}) failed to load: "
            f"{exc}{hint}"
        ) from exc
    if not callable(obj):
        raise RewardError(f"Entry point {entry_point.name!r} ({entry_point.value!r}) is not callable: {obj!r}.")
    return obj


def _load_file(file: str, name: str, base_dir: Path | None) -> ModuleType:
    path = Path(file).expanduser()
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    path = path.resolve()
    if not path.is_file():
        raise RewardError(f"Reward file {file!r} (from {name!r}) does not exist: looked for {path}.")
    # One module name per file path: unique across files with the same stem, and stable so that loading the file
    # twice reuses the module (its @reward registrations stay single) and pickle finds its functions in sys.modules.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"moon_rl_reward_file_{stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RewardError(f"Reward file {path} (from {name!r}) cannot be loaded as a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except (ImportError, SyntaxError, OSError) as exc:
        # Other exceptions propagate unchanged: their traceback already points at the offending line of the file.
        sys.modules.pop(module_name, None)
        hint = _old_import_hint(exc)
        raise RewardError(
            f"Reward file {path} (from {name!r}) failed to import: {type(exc).__name__}: {exc}{hint}"
        ) from exc
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def _old_import_hint(exc: BaseException) -> str:
    """`OLD_IMPORT_HINT` when `exc` is an import error about a top-level `rewards` module, unless its message already
    says it; "" for anything else."""
    failed = (exc.name or "") if isinstance(exc, ImportError) else ""
    if failed != "rewards" and not failed.startswith("rewards."):
        return ""
    # The repository's `rewards/` folder, imported under its old name, refuses with this advice itself.
    return "" if "moon_rl.rewards" in str(exc) else OLD_IMPORT_HINT


def _get_attr(module: ModuleType, attr: str, where: str) -> Callable[..., Any]:
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RewardError(f"{where.capitalize()} has no function {attr!r}.{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"{attr!r} in {where} is not callable: {obj!r}.")
    return obj


def _unknown_message(name: str) -> str:
    available = available_rewards()
    close = difflib.get_close_matches(name, available, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    if not close and "." in name and ":" not in name:
        module, _, fn = name.rpartition(".")
        hint = f" To import a function, write {module}:{fn}."
    return f"Unknown reward {name!r}.{hint} Available rewards: {', '.join(available)}. A reward is {ACCEPTED_FORMS}."


# --- binding --------------------------------------------------------------------------------------------------------


def _bind(obj: Callable[..., Any], args: dict[str, Any], display: str) -> RewardFunc:
    """Bind `args` to `obj` (partial for a function, constructor for a class) after checking them."""
    is_class = inspect.isclass(obj)
    allowed = _named_parameters(obj)
    if allowed is not None:
        reserved = sorted(RESERVED_ARGS & set(args))
        if reserved and not is_class:
            raise RewardError(
                f"Reward {display!r}: {', '.join(reserved)} cannot be set in args; the trainer passes it on every call."
            )
        unknown = sorted(set(args) - set(allowed))
        if unknown:
            valid = ", ".join(allowed) if allowed else "none"
            raise RewardError(
                f"Reward {display!r} has no argument {', '.join(map(repr, unknown))}; valid args: {valid}."
            )
    if is_class:
        try:
            fn = obj(**args)
        except (TypeError, ValueError) as exc:
            raise RewardError(f"Reward {display!r} rejected args {args!r}: {exc}") from exc
        _check_accepts_kwargs(fn.__call__, display)
    else:
        _check_accepts_kwargs(obj, display)
        fn = functools.partial(obj, **args)
    _set_name(fn, display)
    return fn


def _named_parameters(obj: Callable[..., Any]) -> list[str] | None:
    """Parameters `args` may set: explicitly named, minus the per-call ones; None if the signature is unknown."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    bindable = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    skip = set() if inspect.isclass(obj) else RESERVED_ARGS
    return [p.name for p in signature.parameters.values() if p.kind in bindable and p.name not in skip]


def _check_accepts_kwargs(fn: Callable[..., Any], display: str) -> None:
    # TRL passes every dataset column and trainer extra as a keyword; without **kwargs the first step would fail.
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        raise RewardError(
            f"Reward {display!r} must accept **kwargs: trainers pass every dataset column and extras such as "
            "`trainer_state` by keyword."
        )


def _set_name(fn: Any, name: str) -> None:
    # Objects with __slots__ or read-only names keep theirs; the name only labels logs.
    with contextlib.suppress(AttributeError, TypeError):
        fn.__name__ = name


def _qualified_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
