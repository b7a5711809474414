"""`validate_catalogue`: check every row, reference and image of a catalogue and report all problems at once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from moon_rl.data.catalogue import find_layout, resolve_catalogue_path, scan_catalogue
from moon_rl.data.sources import DEFAULT_MAX_PIXELS, Problem
from moon_rl.data.synthetic import SyntheticConfig
from moon_rl.errors import DataError

__all__ = ["ValidationReport", "validate_catalogue"]


@dataclass
class ValidationReport:
    """What `validate_catalogue` found.

    Attributes:
        path (`Path | str`): the catalogue that was checked (a Hub reference stays a string).
        problems (`list[Problem]`): every problem, in file order (products, galleries, then pairs by split).
        n_products (`int`): products that passed their row checks.
        n_pairs (`dict[str, int]`): pairs that passed their row checks, by split.
    """

    path: Path | str
    problems: list[Problem] = field(default_factory=list)
    n_products: int = 0
    n_pairs: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def summary(self) -> str:
        """One line: counts, then `OK` or the number of problems."""
        pairs = ", ".join(f"{split} {n}" for split, n in self.n_pairs.items()) or "none"
        verdict = "OK" if self.ok else f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        return f"catalogue {self.path}: {self.n_products} products, pairs: {pairs}; {verdict}"


def validate_catalogue(
    path: str | Path,
    *,
    synthetic: SyntheticConfig | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    columns: Mapping[str, str] | None = None,
    splits: Mapping[str, str] | None = None,
) -> ValidationReport:
    """Check a catalogue completely and collect every problem (it never stops at the first).

    Checks: unreadable lines (bad JSON, non-UTF-8), missing / wrongly-typed / unknown fields, duplicate product ids,
    missing, unreadable, corrupt or oversized images (every image is decoded), pairs and galleries that name unknown
    products, positives missing from an explicit gallery, and an empty catalogue.

    Args:
        path (`str | Path`): a catalogue folder, a single products file, a Hub dataset (`hf:owner/name`), a folder
            `datasets` reads, or `"builtin:synthetic"`.
        synthetic (`SyntheticConfig`, *optional*): options of the builtin synthetic catalogue.
        max_pixels (`int`, *optional*, defaults to `40_000_000`): decompression-bomb limit.
        columns (`Mapping[str, str]`, *optional*): `data.columns`, moon-rl field -> the tables' column; problems name
            the tables' columns.
        splits (`Mapping[str, str]`, *optional*): `data.splits`, moon-rl split -> the catalogue's split.

    Returns:
        `ValidationReport`: `report.ok` is True when nothing is wrong; print each of `report.problems` otherwise.
    """
    try:
        folder = resolve_catalogue_path(path, synthetic)
        layout = find_layout(folder, columns=columns, splits=splits)
    except DataError as exc:
        return ValidationReport(Path(str(path)), [Problem(str(path), None, None, None, str(exc))])
    problems: list[Problem] = []
    catalogue = scan_catalogue(layout, problems.append, decode_images=True, max_pixels=max_pixels)
    return ValidationReport(
        path=folder,
        problems=problems,
        n_products=len(catalogue.products),
        n_pairs={split: len(pairs) for split, pairs in catalogue.pairs.items()},
    )
