"""Where each key of a loaded recipe was written: the file of the `extends` chain, or `--set`.

Every message about a recipe names the place to fix, so the loader records, for every key path it merges, the file
(or override) that wrote it last; checks then ask `Provenance.blame` which of those to name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["OVERRIDE_SOURCE", "Origins", "Provenance", "lookup_origin"]

#: Where a key set by a `--set` override "was written", in error messages.
OVERRIDE_SOURCE = "--set"

#: Key path (e.g. `("sft", "learning_rate")`) -> the file (as messages show it) or `--set` that wrote it.
Origins = dict[tuple[str, ...], str]


def lookup_origin(origins: Origins, key: tuple[Any, ...], fallback: str | None) -> str | None:
    """The source of the longest recorded prefix of `key` (a list index or a default inherits its section's)."""
    for end in range(len(key), 0, -1):
        found = origins.get(tuple(str(part) for part in key[:end]))
        if found is not None:
            return found
    return fallback


@dataclass(frozen=True)
class Provenance:
    """What a recipe was loaded from. Empty for a recipe built in code (`Recipe()`)."""

    #: Key path -> the file or `--set` that wrote it last.
    origins: Origins = field(default_factory=dict)
    #: Recipe files as messages show them, base of the `extends` chain first.
    files: tuple[str, ...] = ()
    #: The `--set` overrides applied, in order.
    overrides: tuple[str, ...] = ()

    def origin(self, key: str) -> str | None:
        """Where a dotted key (e.g. `"sft.learning_rate"`) was set: a recipe file, `"--set"`, or None (a default)."""
        return lookup_origin(self.origins, tuple(key.split(".")), None)

    def blame(self, *keys: str) -> str:
        """The file (or `--set`) to name for a problem with dotted `keys`: the last writer among them, `--set`
        outranking every file (overrides apply last); the top file when none of them was written, `"recipe"` when
        there is no file."""
        found = [origin for key in keys if (origin := self.origin(key)) is not None]
        rank = {source: i for i, source in enumerate([*self.files, OVERRIDE_SOURCE])}
        if found:
            return max(found, key=lambda source: rank.get(source, -1))
        return self.files[-1] if self.files else "recipe"
