"""What `synthesize` wrote (`SynthReport`), and the exact text-only analysis of its held-out split.

moon_rl/data/synthetic.py builds the catalogue; this module only counts and summarises it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = ["SynthReport", "text_analysis"]


@dataclass(frozen=True)
class SynthReport:
    """What `synthesize` wrote, with the text-only analysis of the test split.

    Attributes:
        chance_r1 (`float`): mean over test text queries of 1 / |gallery|.
        text_ceiling_r1 (`float`): mean over test text queries of 1 / |gallery products consistent with the query's
            text| - the expected Recall@1 of the best text-only method.
        ambiguous_fraction (`float`): fraction of test text queries with more than one consistent gallery product.
        validation (`bool`): the test split is held-out training families (`SyntheticConfig.validation`).
    """

    out: Path
    n_products: int
    n_families: int
    n_train_products: int
    n_test_products: int
    n_pairs: dict[str, int]
    chance_r1: float
    text_ceiling_r1: float
    ambiguous_fraction: float
    n_views: int  # no default: the generator's `N_VIEWS` is the one source of it
    seconds: float = 0.0
    validation: bool = False

    def summary(self) -> str:
        """Multi-line human-readable summary (the CLI prints it)."""
        pairs = ", ".join(f"{split} {n}" for split, n in self.n_pairs.items())
        held_out = " (validation families as the test split; the real test families left out)" if self.validation else ""
        test = [
            f"  test gallery: {self.n_test_products} products (each with its look-alike family)",
            f"  Recall@1 chance: {self.chance_r1:.3f}   text-only ceiling: {self.text_ceiling_r1:.3f}   "
            f"queries ambiguous from text: {self.ambiguous_fraction:.1%}",
        ] if self.n_test_products else ["  no test split (test_fraction 0): every family is for training"]
        return "\n".join([
            f"synthetic catalogue -> {self.out}{held_out}",
            f"  products: {self.n_products} in {self.n_families} families "
            f"(train {self.n_train_products}, test {self.n_test_products}); {self.n_views} views each",
            f"  pairs: {pairs}",
            *test,
            f"  written in {self.seconds:.1f} s",
        ])  # fmt: skip


class _Product(Protocol):
    id: str
    attrs: dict[str, str]  # every attribute's value (a text query names them all)
    named: dict[str, str]  # the values the product's title and description name


def text_analysis(test_items: Sequence[_Product]) -> dict[str, Any]:
    """Exact text-only analysis of the test split (one text query per test product, gallery = test products)."""
    if not test_items:
        return {"chance_r1": 0.0, "text_ceiling_r1": 0.0, "ambiguous_fraction": 0.0, "positive_unique": True}
    ceiling, ambiguous, unique = 0.0, 0, True
    for query in test_items:
        consistent = [g for g in test_items if all(query.attrs[a] == v for a, v in g.named.items())]
        ceiling += 1.0 / len(consistent)
        ambiguous += len(consistent) > 1
        unique &= [g.id for g in test_items if g.attrs == query.attrs] == [query.id]
    n = len(test_items)
    return {
        "chance_r1": round(1.0 / n, 6),
        "text_ceiling_r1": round(ceiling / n, 6),
        "ambiguous_fraction": round(ambiguous / n, 6),
        "positive_unique": unique,
    }
