"""Text rewards: the structure, content and length of the reasoning.

Completions are plain strings or TRL's conversational form, `[{"role": "assistant", "content": str}]`.
moon-rl's GRPO trainer also passes `truncated` (`list[bool]`: the completion hit the length limit without an
end-of-turn token) and the dataset's `attributes` column; a plain TRL trainer passes neither, and then no completion
counts as truncated and no product has attributes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from moon_rl.rewards.registry import reward

__all__ = ["FormatReward", "Length", "attribute_recall", "completion_text"]

_THINK_BLOCK = re.compile(r"\s*<think>(?P<body>.*?)</think>\s*", re.DOTALL)
_THINK_TAG = re.compile(r"</?think>")


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    r"""
    The text of one completion, plain or conversational.

    Args:
        completion (`str` or `list[dict]`):
            A string, or messages whose `content` is a string or a list of `{"type": "text", "text": ...}` parts.

    Returns:
        `str`: The text, messages joined in order.

    Example:
    ```python
    >>> from moon_rl.rewards import completion_text
    >>> completion_text([{"role": "assistant", "content": "<think>red</think>"}])
    '<think>red</think>'

    ```
    """
    if isinstance(completion, str):
        return completion
    parts: list[str] = []
    for message in completion:
        content = message.get("content") or ""
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(part.get("text", "") for part in content if part.get("type") == "text")
    return "".join(parts)


@reward("format")
class FormatReward:
    r"""
    `1.0` for a completion that is exactly one well-formed `<think>...</think>` block and was not truncated, else `0.0`.

    Well formed: optional leading whitespace, `<think>`, non-blank content without another `<think>` or `</think>`,
    `</think>`, then nothing but whitespace (the read-out embedding follows the reasoning, so there is no answer
    text). TRL strips the end-of-turn token when decoding, so a completion cut by the length limit can look complete;
    the trainer's `truncated` flags catch it.

    A class rather than a function only so that its instances are named `format` in logs without shadowing Python's
    `format` builtin.

    Example:
    ```python
    >>> from moon_rl.rewards import FormatReward
    >>> fmt = FormatReward()
    >>> fmt(["<think>red wool</think>", "<think></think>", "<think>red</think> answer", "<think>cut off</think>"],
    ...     truncated=[False, False, False, True])
    [1.0, 0.0, 0.0, 0.0]

    ```
    """

    def __init__(self) -> None:
        # TRL logs a callable object by its `__name__`.
        self.__name__ = "format"

    def __repr__(self) -> str:
        return "FormatReward()"

    def __call__(
        self,
        completions: Sequence[str | Sequence[Mapping[str, Any]]],
        truncated: Sequence[bool] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """Score each completion; see the class docstring."""
        flags = _flags(truncated, len(completions), "format")
        return [
            1.0 if not cut and _is_one_think_block(completion_text(c)) else 0.0
            for c, cut in zip(completions, flags, strict=True)
        ]


def _is_one_think_block(text: str) -> bool:
    match = _THINK_BLOCK.fullmatch(text)
    if match is None:
        return False
    body = match["body"]
    # The lazy body can still swallow "</think>x</think>" or a nested "<think>"; both are malformed.
    return bool(body.strip()) and _THINK_TAG.search(body) is None


@reward("attribute_recall")
def attribute_recall(
    completions: Sequence[str | Sequence[Mapping[str, Any]]],
    attributes: Sequence[Mapping[str, Any] | None] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    r"""
    Fraction of the product's ground-truth attribute values that the reasoning names.

    A value counts when it appears in the completion (think tags removed) as a whole word or phrase, ignoring case
    and runs of whitespace: `red` matches "Red wool" but not "redwood", `navy blue` matches "navy  Blue". Each
    attribute counts once, even if two share a value. Products without attributes (`{}`, `None`, or only empty
    values) get `None`, which excludes them from this reward.

    Args:
        completions (`Sequence`):
            The completions.
        attributes (`Sequence[dict[str, str] | None]`, *optional*):
            The dataset's `attributes` column, one mapping per completion. Keys are ignored; `None` values are skipped
            because a dataset's struct column fills the keys other rows have with `None`.
        **kwargs:
            Other keywords from the trainer, ignored.

    Returns:
        `list[float | None]`: One recall in `[0, 1]` per completion, or `None`.

    Example:
    ```python
    >>> from moon_rl.rewards import attribute_recall
    >>> attribute_recall(["<think>A red wool scarf</think>", "<think>A redwood box</think>"],
    ...                  attributes=[{"color": "red", "material": "wool"}, {"color": "red"}])
    [1.0, 0.0]

    ```
    """
    if attributes is None:
        return [None] * len(completions)
    if len(attributes) != len(completions):
        raise ValueError(f"Reward 'attribute_recall': {len(completions)} completions but {len(attributes)} attributes.")
    rewards: list[float | None] = []
    for completion, product in zip(completions, attributes, strict=True):
        values = [str(v).strip() for v in (product or {}).values() if v is not None and str(v).strip()]
        if not values:
            rewards.append(None)
            continue
        text = _THINK_TAG.sub(" ", completion_text(completion))
        named = sum(_names(text, value) for value in values)
        rewards.append(named / len(values))
    return rewards


def _names(text: str, value: str) -> bool:
    # Lookarounds instead of \b, so that values starting or ending with a non-word character ("C++", "100%") match.
    phrase = r"\s+".join(re.escape(word) for word in value.split())
    return re.search(rf"(?<!\w){phrase}(?!\w)", text, re.IGNORECASE) is not None


@reward("length")
class Length:
    r"""
    Keep the reasoning within a token budget.

    `1.0` while the completion has at most `budget` tokens, falling linearly to `0.0` at `2 * budget` tokens (and
    staying there), and `-penalty` for a truncated completion, which never reached its end-of-turn.

    Args:
        budget (`int`, *optional*, defaults to `64`):
            Tokens allowed at full reward; must be positive.
        penalty (`float`, *optional*, defaults to `1.0`):
            Size of the (negative) reward of a truncated completion; must be non-negative.

    Example:
    ```python
    >>> from moon_rl.rewards import Length
    >>> length = Length(budget=4, penalty=1.0)
    >>> length(["a", "b", "c", "d"], completion_ids=[[0] * 4, [0] * 6, [0] * 9, [0] * 3], truncated=[0, 0, 0, 1])
    [1.0, 0.5, 0.0, -1.0]

    ```
    """

    def __init__(self, budget: int = 64, penalty: float = 1.0) -> None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
            raise ValueError(f"`budget` must be a positive integer (tokens), got {budget!r}.")
        if (
            isinstance(penalty, bool)
            or not isinstance(penalty, int | float)
            or not math.isfinite(penalty)
            or penalty < 0
        ):
            raise ValueError(f"`penalty` must be a finite non-negative number, got {penalty!r}.")
        self.budget = budget
        self.penalty = float(penalty)
        # TRL logs a callable object by its `__name__`.
        self.__name__ = "length"

    def __repr__(self) -> str:
        return f"Length(budget={self.budget}, penalty={self.penalty})"

    def __call__(
        self,
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        truncated: Sequence[bool] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """Score each completion; see the class docstring."""
        if completion_ids is None or len(completion_ids) != len(completions):
            raise ValueError("Reward 'length' needs `completion_ids`, one list of token ids per completion.")
        flags = _flags(truncated, len(completions), "length")
        rewards: list[float | None] = []
        for ids, cut in zip(completion_ids, flags, strict=True):
            over = max(0, len(ids) - self.budget)
            rewards.append(-self.penalty if cut else max(0.0, 1.0 - over / self.budget))
        return rewards


def _flags(truncated: Sequence[bool] | None, n: int, name: str) -> list[bool]:
    if truncated is None:
        return [False] * n
    if len(truncated) != n:
        raise ValueError(f"Reward {name!r}: {n} completions but {len(truncated)} `truncated` flags.")
    return [bool(flag) for flag in truncated]
