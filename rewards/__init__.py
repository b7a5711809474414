"""Pluggable GRPO rewards for moon-rl.

A reward follows TRL's contract, `fn(completions, **kwargs) -> list[float | None]` (one value per completion,
`None` excludes it), and is a pure function of tensors and columns, testable without a trainer. Importing this
package registers the built-ins:

- `retrieval_rank`: reciprocal rank of the positive among the candidates,
- `retrieval_margin` (`temperature`): positive similarity minus a softmax-weighted mean of the negatives',
- `retrieval_logprob` (`temperature`, `direction`): log-probability of the right match under a softmax, completion
  searching queries, query searching other products' completions (what evaluation measures), or the mean of both,
- `format`: exactly one well-formed `<think>...</think>` block, not truncated,
- `attribute_recall`: fraction of the product's attribute values the reasoning names,
- `length` (`budget`, `penalty`): a token budget with a truncation penalty.

Recipes name rewards through `resolve_reward` / `build_rewards` (registered name, entry point in group
`moon_rl.rewards`, `package.module:fn` or `path/to/file.py:fn`); `build_rewards` returns one `RewardEntry(name, fn,
weight)` per recipe entry, names unique. `@reward("name")` registers your own: `from moon_rl.rewards import reward`.

The package lives in the repository's top-level `rewards/` folder and installs as `moon_rl.rewards` (issue 15: a
top-level `rewards` in site-packages clashed with the PyPI distribution of that name).
"""

if __name__ != "moon_rl.rewards":
    # Python run from the repository's root finds this folder as `rewards`, the import path before issue 15. Imported
    # under that name it would hold a second registry, and rewards registered into it would be silently missing from
    # every recipe: refuse, and say what to write instead.
    raise ImportError(
        "moon-rl's reward package is `moon_rl.rewards`, no longer `rewards`: write `from moon_rl.rewards import "
        "reward` (and name modules `moon_rl.rewards.<module>:<fn>` in a recipe).",
        name=__name__,
    )

from moon_rl.rewards.registry import (
    ENTRY_POINT_GROUP,
    RewardEntry,
    RewardError,
    RewardFunc,
    available_rewards,
    build_rewards,
    resolve_reward,
    reward,
)
from moon_rl.rewards.retrieval import RetrievalLogprob, RetrievalMargin, retrieval_rank
from moon_rl.rewards.text import FormatReward, Length, attribute_recall, completion_text

__all__ = [
    "ENTRY_POINT_GROUP",
    "FormatReward",
    "Length",
    "RetrievalLogprob",
    "RetrievalMargin",
    "RewardEntry",
    "RewardError",
    "RewardFunc",
    "attribute_recall",
    "available_rewards",
    "build_rewards",
    "completion_text",
    "reward",
    "resolve_reward",
    "retrieval_rank",
]
