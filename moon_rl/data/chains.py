"""Chain attribute accuracy: does a reasoning chain name the product's attribute values?

The reasoning is only worth its tokens if it says something true about the product. For each attribute of a
catalogue (`colour`, `material`, ...), the *vocabulary* is every value the catalogue's products take for it; a chain
*names* a value when the value appears in it as whole words (case-insensitive, so `red` is not found in `tired`, and a
multi-word value like `navy blue` must appear as that phrase). Per attribute:

- `right`: share of chains that name the product's own value;
- `wrong`: share of chains that name another value of the attribute (a chain may do both);
- `chance`: the expected `right` of a chain naming one value drawn from the catalogue's distribution of that
  attribute (sum of squared value frequencies), for comparison.

Pure functions of strings and dicts: evaluation reports them for greedy chains, GRPO logs them for sampled chains,
and whether its reward preferred the chains that name the truth (`reward_prefers_truth`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "AttributeVocabulary", "attribute_vocabulary", "chain_attribute_accuracy", "named_values", "replace_value",
    "reward_prefers_truth", "value_spans",
]

#: attribute -> {value (lowercase) -> how many products have it}
AttributeVocabulary = dict[str, dict[str, int]]


def attribute_vocabulary(attributes: Iterable[Mapping[str, str]]) -> AttributeVocabulary:
    """Every value each attribute takes over `attributes` (one mapping per product), with its product count."""
    counts: dict[str, Counter] = {}
    for attrs in attributes:
        for name, value in (attrs or {}).items():
            text = str(value).strip().lower()
            if text:
                counts.setdefault(name, Counter())[text] += 1
    return {name: dict(sorted(counter.items())) for name, counter in sorted(counts.items())}


_WORD = r"(?<![a-z0-9])(?:{})(?![a-z0-9])"  # a value as whole words: `red` is not in `tired`


def _pattern(values: Iterable[str]) -> re.Pattern[str]:
    # Longest first, so "navy blue" wins over "blue" where both are values.
    return re.compile(_WORD.format("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))))


def replace_value(chain: str, value: str, other: str) -> str:
    """`chain` with every whole-word occurrence of `value` (any case) replaced by `other`."""
    return re.sub(_WORD.format(re.escape(value)), other, chain, flags=re.IGNORECASE)


def named_values(chain: str, vocabulary: AttributeVocabulary) -> dict[str, set[str]]:
    """The values of each attribute that `chain` names (attributes it names none of are left out)."""
    text = chain.lower()
    named: dict[str, set[str]] = {}
    for name, values in vocabulary.items():
        if values and (found := set(_pattern(values).findall(text))):
            named[name] = found
    return named


def value_spans(chain: str, vocabulary: AttributeVocabulary) -> list[tuple[int, int]]:
    """Character spans `(start, end)` of every attribute value `chain` names (any attribute), in order."""
    text = chain.lower()
    spans = {m.span() for values in vocabulary.values() if values for m in _pattern(values).finditer(text)}
    return sorted(spans)


def chain_attribute_accuracy(
    chains: Sequence[str], attributes: Sequence[Mapping[str, str]], vocabulary: AttributeVocabulary | None = None,
) -> dict[str, dict[str, float]]:
    """Per attribute, the share of chains naming the right value, a wrong value, and chance (see module docstring).

    Args:
        chains (`Sequence[str]`): one reasoning chain per product (decoded text).
        attributes (`Sequence[Mapping[str, str]]`): each chain's product attributes.
        vocabulary (`AttributeVocabulary`, *optional*): values per attribute; defaults to those of `attributes`.

    Returns:
        `dict[str, dict[str, float]]`: `{attribute: {"right", "wrong", "chance", "n"}}`, over the chains whose product
        has that attribute (`n` of them); attributes no product has are left out.

    Example:
    ```python
    >>> chain_attribute_accuracy(["colour red. material wool."], [{"colour": "red", "material": "silk"}],
    ...                          {"colour": {"red": 1, "blue": 1}, "material": {"silk": 1, "wool": 1}})
    {'colour': {'right': 1.0, 'wrong': 0.0, 'chance': 0.5, 'n': 1}, 'material': {'right': 0.0, 'wrong': 1.0, 'chance': 0.5, 'n': 1}}

    ```
    """
    if len(chains) != len(attributes):
        raise ValueError(f"chain_attribute_accuracy: {len(chains)} chains for {len(attributes)} attribute sets")
    vocabulary = vocabulary if vocabulary is not None else attribute_vocabulary(attributes)
    right: Counter = Counter()
    wrong: Counter = Counter()
    total: Counter = Counter()
    for chain, attrs in zip(chains, attributes, strict=True):
        named = named_values(chain, vocabulary)
        for name, value in (attrs or {}).items():
            if name not in vocabulary:
                continue
            truth = str(value).strip().lower()
            total[name] += 1
            found = named.get(name, set())
            right[name] += truth in found
            wrong[name] += bool(found - {truth})
    result: dict[str, dict[str, float]] = {}
    for name in vocabulary:
        if total[name]:
            frequencies = vocabulary[name].values()
            size = sum(frequencies)
            result[name] = {"right": right[name] / total[name], "wrong": wrong[name] / total[name],
                            "chance": sum((c / size) ** 2 for c in frequencies), "n": total[name]}
    return result


def reward_prefers_truth(
    chains: Sequence[str], attributes: Sequence[Mapping[str, str]], rewards: Sequence[float], group_size: int,
    vocabulary: AttributeVocabulary,
) -> dict[str, tuple[int, int]]:
    """Per attribute: the groups where the reward preferred a chain naming the truth, of the groups that had to choose.

    A group (`group_size` consecutive chains of one product, as GRPO samples them) *has to choose* for an attribute when
    some of its chains name exactly the product's value and others do not (a wrong value, several, or none). The reward
    *prefers the truth* there when its best right chain scores strictly above its best other chain: a tie is no
    preference. A reward that teaches the attribute does so in most such groups; one at or below half pushes the policy
    away from the truth as often as towards it.

    Args:
        chains (`Sequence[str]`): the sampled chains (decoded text), groups contiguous.
        attributes (`Sequence[Mapping[str, str]]`): each chain's product attributes.
        rewards (`Sequence[float]`): each chain's total reward (NaN: no reward; never the best).
        group_size (`int`): chains per group.
        vocabulary (`AttributeVocabulary`): values per attribute.

    Returns:
        `dict[str, tuple[int, int]]`: `{attribute: (groups where the reward preferred the truth, groups that had to
        choose)}`, for the attributes where at least one group had to choose.

    Example:
    ```python
    >>> vocabulary = {"pattern": {"solid": 1, "striped": 1}}
    >>> chains = ["pattern solid.", "pattern striped.", "pattern solid.", "pattern solid."]
    >>> reward_prefers_truth(chains, [{"pattern": "solid"}] * 4, [0.2, 0.9, 0.5, 0.5], 2, vocabulary)
    {'pattern': (0, 1)}

    ```
    """
    if not len(chains) == len(attributes) == len(rewards) or group_size < 1 or len(chains) % group_size:
        raise ValueError(f"reward_prefers_truth: {len(chains)} chains, {len(attributes)} attribute sets and "
                         f"{len(rewards)} rewards must be equal in number and a multiple of group_size={group_size}")
    counts: dict[str, list[int]] = {}
    for start in range(0, len(chains), group_size):
        rows = range(start, start + group_size)
        named = [named_values(chains[i], vocabulary) for i in rows]
        for name, value in (attributes[start] or {}).items():
            if name not in vocabulary:
                continue
            truth = str(value).strip().lower()
            right = [found.get(name) == {truth} for found in named]
            if all(right) or not any(right):
                continue
            score = [-math.inf if math.isnan(float(rewards[i])) else float(rewards[i]) for i in rows]
            best_right = max(s for s, r in zip(score, right, strict=True) if r)
            best_other = max(s for s, r in zip(score, right, strict=True) if not r)
            tally = counts.setdefault(name, [0, 0])
            tally[0] += best_right > best_other
            tally[1] += 1
    return {name: (won, total) for name, (won, total) in counts.items()}
