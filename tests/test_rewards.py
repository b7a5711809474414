"""Tests of `moon_rl.rewards` (the rewards/ folder): built-ins on hand-made tensors with exact answers, every way a name
resolves, and the import path before issue 15 refused with the new one."""

from __future__ import annotations

import dataclasses
import doctest
import functools
import importlib.metadata
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moon_rl import rewards
from moon_rl.errors import RecipeError
from moon_rl.rewards import (
    FormatReward,
    Length,
    RetrievalLogprob,
    RetrievalMargin,
    RewardEntry,
    RewardError,
    attribute_recall,
    available_rewards,
    build_rewards,
    resolve_reward,
    retrieval_rank,
)
from moon_rl.rewards import registry as registry_module
from moon_rl.rewards import retrieval as retrieval_module
from moon_rl.rewards import text as text_module

BUILTINS = ["attribute_recall", "format", "length", "retrieval_logprob", "retrieval_margin", "retrieval_rank"]


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    """Each test registers into a copy, so test rewards never leak into other tests."""
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))


def _retrieval_batch() -> dict[str, torch.Tensor]:
    # Three unit candidates; each completion's similarities are (0.8, 0.6, 0.0) in some order, so the positives
    # (rows 0, 1, 2) rank 1st, 2nd and 3rd.
    candidates = torch.eye(3)
    embeddings = torch.tensor([[0.8, 0.6, 0.0], [0.8, 0.6, 0.0], [0.8, 0.6, 0.0]])
    return {"embeddings": embeddings, "candidates": candidates, "positive_index": torch.tensor([0, 1, 2])}


# --- retrieval_rank -------------------------------------------------------------------------------------------------


def test_retrieval_rank_is_the_reciprocal_rank_and_logs_nothing():
    # The trainer logs `retrieval/mrr` over the whole candidate pool; a second one from the reward would clash.
    logged: list[tuple[str, float]] = []
    out = retrieval_rank(["a", "b", "c"], **_retrieval_batch(), log_metric=lambda k, v: logged.append((k, v)))
    assert out == [1.0, 0.5, 1 / 3]
    assert logged == []


def test_retrieval_rank_ignores_a_masked_higher_scoring_candidate():
    # The positive (0) scores 0.6, candidate 1 scores 0.8: rank 2. Masking candidate 1 (another query of the same
    # product) makes it rank 1; masking the positive itself changes nothing, it always counts.
    candidates = torch.eye(3)
    embeddings = torch.tensor([[0.6, 0.8, 0.0]])
    batch = {"embeddings": embeddings, "candidates": candidates, "positive_index": torch.tensor([0])}
    assert retrieval_rank(["a"], **batch) == [0.5]
    assert retrieval_rank(["a"], **batch, candidate_mask=torch.tensor([[True, False, True]])) == [1.0]
    assert retrieval_rank(["a"], **batch, candidate_mask=torch.tensor([[False, True, True]])) == [0.5]


def test_retrieval_rank_counts_only_strictly_better_candidates():
    # Candidates 0 and 1 tie with the positive (1); candidate 2 beats it: rank 2, not 3.
    candidates = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    embeddings = torch.tensor([[0.6, 0.8]])
    out = retrieval_rank(["a"], embeddings=embeddings, candidates=candidates, positive_index=torch.tensor([1]))
    assert out == [0.5]


def test_retrieval_rank_ignores_unused_kwargs_and_accepts_conversational_completions():
    completions = [[{"role": "assistant", "content": "<think>x</think>"}]] * 3
    out = retrieval_rank(completions, **_retrieval_batch(), prompts=["p"] * 3, trainer_state=None, colour=["r"] * 3)
    assert out == [1.0, 0.5, 1 / 3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs embeddings, candidates, positive_index"),
        ({"positive_index": torch.tensor([0, 1])}, "3 completions"),
        ({"candidates": torch.eye(4)}, "same D"),
        ({"positive_index": torch.tensor([0, 1, 3])}, "out of range"),
    ],
)
def test_retrieval_rewards_reject_missing_or_inconsistent_tensors(kwargs, message):
    batch = _retrieval_batch() if kwargs else {}
    batch.update(kwargs)
    for fn in (retrieval_rank, RetrievalMargin(), RetrievalLogprob()):
        with pytest.raises(ValueError, match=re.escape(message)):
            fn(["a", "b", "c"], **batch)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.ones(3, 3), "candidate_mask must be a bool tensor, got a torch.float32 tensor of shape (3, 3)."),
        ([[True] * 3] * 3, "candidate_mask must be a bool tensor, got list."),
        (torch.ones(3, 2, dtype=torch.bool), "candidate_mask (3, 2) must be (N, M) = (3, 3)"),
    ],
)
def test_retrieval_rewards_reject_a_bad_candidate_mask(mask, message):
    for fn in (retrieval_rank, RetrievalMargin(), RetrievalLogprob()):
        with pytest.raises(ValueError, match=re.escape(message)):
            fn(["a", "b", "c"], **_retrieval_batch(), candidate_mask=mask)


# --- retrieval_margin -----------------------------------------------------------------------------------------------


def test_retrieval_margin_by_hand_with_two_negatives():
    # Similarities to the candidates: positive 0.6, negatives 0.0 and 0.8.
    candidates = torch.tensor([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.8, 0.6, 0.0]])
    embeddings = torch.tensor([[1.0, 0.0, 0.0]])
    tau = 0.5
    w_low, w_high = math.exp(0.0 / tau), math.exp(0.8 / tau)
    expected = 0.6 - (0.0 * w_low + 0.8 * w_high) / (w_low + w_high)
    out = RetrievalMargin(temperature=tau)(
        ["a"], embeddings=embeddings, candidates=candidates, positive_index=torch.tensor([0])
    )
    assert out == pytest.approx([expected], abs=1e-7)


def test_retrieval_margin_ignores_masked_negatives():
    # As above, with the 0.8 negative masked: the only negative left scores 0.0, whatever the temperature.
    candidates = torch.tensor([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.8, 0.6, 0.0]])
    batch = {
        "embeddings": torch.tensor([[1.0, 0.0, 0.0]]),
        "candidates": candidates,
        "positive_index": torch.tensor([0]),
    }
    out = RetrievalMargin(temperature=0.5)(["a"], **batch, candidate_mask=torch.tensor([[True, True, False]]))
    assert out == pytest.approx([0.6], abs=1e-7)
    # Every negative masked: no negatives, so None, as with a single candidate.
    assert RetrievalMargin()(["a"], **batch, candidate_mask=torch.tensor([[True, False, False]])) == [None]


def test_retrieval_margin_is_the_gap_to_the_hardest_negative_at_low_temperature():
    out = RetrievalMargin(temperature=1e-4)(["a", "b", "c"], **_retrieval_batch())
    assert out == pytest.approx([0.8 - 0.6, 0.6 - 0.8, 0.0 - 0.8], abs=1e-6)


def test_retrieval_margin_without_negatives_is_none():
    out = RetrievalMargin()(
        ["a", "b"], embeddings=torch.eye(2)[:, :1], candidates=torch.ones(1, 1), positive_index=torch.tensor([0, 0])
    )
    assert out == [None, None]


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), float("inf"), True, "0.1"])
def test_retrieval_margin_rejects_bad_temperatures(temperature):
    with pytest.raises(ValueError, match="temperature"):
        RetrievalMargin(temperature=temperature)


# --- retrieval_logprob ----------------------------------------------------------------------------------------------


def _lse(*logits: float) -> float:
    return math.log(sum(math.exp(x) for x in logits))


def _two_products() -> dict:
    # Queries 0 and 1 show product A, query 2 product B; completions c0 (A, query 0), c1 (A, query 1), c2 (B, query 2).
    # At temperature 0.5 the logits s/T are: c0 (1.6, 1.2, 0), c1 (1.2, 1.6, 0), c2 (1.2, 0, 1.6).
    return {
        "embeddings": torch.tensor([[0.8, 0.6, 0.0], [0.6, 0.8, 0.0], [0.6, 0.0, 0.8]]),
        "candidates": torch.eye(3),
        "positive_index": torch.tensor([0, 1, 2]),
    }


# Each query's other same-product query is no negative.
SAME_PRODUCT_MASK = torch.tensor([[True, False, True], [False, True, True], [True, True, True]])


def _logprob(direction: str, **kwargs) -> list[float | None]:
    return RetrievalLogprob(temperature=0.5, direction=direction)(["a", "b", "c"], **{**_two_products(), **kwargs})


def test_retrieval_logprob_completion_to_query_by_hand():
    assert _logprob("completion_to_query") == pytest.approx([1.6 - _lse(1.6, 1.2, 0.0)] * 3, abs=1e-6)
    # Masking the same-product query removes exactly its term from c0's and c1's normaliser; c2 had none.
    masked = _logprob("completion_to_query", candidate_mask=SAME_PRODUCT_MASK)
    assert masked == pytest.approx([1.6 - _lse(1.6, 0.0), 1.6 - _lse(1.6, 0.0), 1.6 - _lse(1.6, 1.2, 0.0)], abs=1e-6)


def test_retrieval_logprob_query_to_completion_by_hand():
    # Query p_i ranks completion i against the other products' completions, read down column p_i of the logits.
    by_product = [1.6 - _lse(1.6, 1.2), 1.6 - _lse(1.6, 0.0), 1.6 - _lse(1.6, 0.0, 0.0)]
    assert _logprob("query_to_completion", product_id=["A", "A", "B"]) == pytest.approx(by_product, abs=1e-6)
    # Without product ids, distinct positives mean distinct products: c1 competes for query 0 and c0 for query 1.
    by_positive = [1.6 - _lse(1.6, 1.2, 1.2), 1.6 - _lse(1.6, 1.2, 0.0), by_product[2]]
    assert _logprob("query_to_completion") == pytest.approx(by_positive, abs=1e-6)
    # The trainer's same-product mask excludes them just as product ids do.
    assert _logprob("query_to_completion", candidate_mask=SAME_PRODUCT_MASK) == pytest.approx(by_product, abs=1e-6)
    # `product_ids` (the trainer's) wins over the dataset's `product_id` column.
    out = _logprob("query_to_completion", product_ids=["A", "B", "C"], product_id=["A", "A", "B"])
    assert out == pytest.approx(by_positive, abs=1e-6)


def test_retrieval_logprob_both_is_the_mean_of_the_directions():
    kwargs = {"product_id": ["A", "A", "B"], "candidate_mask": SAME_PRODUCT_MASK}
    c2q, q2c = _logprob("completion_to_query", **kwargs), _logprob("query_to_completion", **kwargs)
    assert _logprob("both", **kwargs) == pytest.approx([(a + b) / 2 for a, b in zip(c2q, q2c, strict=True)], abs=1e-12)
    assert RetrievalLogprob().direction == "both"


def test_retrieval_logprob_separates_completions_that_both_rank_first():
    # c0 and c1 (both query 0, one product: two generations of one prompt) both rank first; c1 is the closer. With no
    # product ids the shared positive makes them one product, so they do not compete for query 0.
    # Logits at T = 0.5: c0 (1.6, 1.2), c1 (1.92, 0.56), c2 (1.2, 1.6).
    batch = {
        "embeddings": torch.tensor([[0.8, 0.6], [0.96, 0.28], [0.6, 0.8]]),
        "candidates": torch.eye(2),
        "positive_index": torch.tensor([0, 0, 1]),
    }
    assert retrieval_rank(["a", "b", "c"], **batch) == [1.0, 1.0, 1.0]
    c2q = RetrievalLogprob(0.5, "completion_to_query")(["a", "b", "c"], **batch)
    q2c = RetrievalLogprob(0.5, "query_to_completion")(["a", "b", "c"], **batch)
    assert c2q == pytest.approx([1.6 - _lse(1.6, 1.2), 1.92 - _lse(1.92, 0.56), 1.6 - _lse(1.2, 1.6)], abs=1e-6)
    assert q2c == pytest.approx([1.6 - _lse(1.6, 1.2), 1.92 - _lse(1.92, 1.2), 1.6 - _lse(1.6, 1.2, 0.56)], abs=1e-6)
    assert c2q[1] > c2q[0] + 0.1 and q2c[1] > q2c[0] + 0.1
    assert all(isinstance(r, float) for r in c2q + q2c)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0}, "`temperature` must be a positive number, got 0."),
        ({"temperature": float("inf")}, "`temperature` must be finite, got inf."),
        ({"temperature": "0.1"}, "`temperature` must be a positive number, got '0.1'."),
        (
            {"direction": "query2completion"},
            "`direction` must be one of 'completion_to_query', 'query_to_completion', 'both', got 'query2completion'.",
        ),
    ],
)
def test_retrieval_logprob_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RetrievalLogprob(**kwargs)


def test_retrieval_logprob_rejects_product_ids_of_the_wrong_length():
    with pytest.raises(ValueError, match=re.escape("Reward 'retrieval_logprob': 3 completions but 2 product ids.")):
        _logprob("both", product_id=["A", "B"])


def test_retrieval_logprob_resolves_with_args():
    fn = resolve_reward("retrieval_logprob", {"temperature": 0.5, "direction": "completion_to_query"})
    assert fn.__name__ == "retrieval_logprob"
    # The args reach the computation: the rewards are the hand-checked ones at 0.5 / completion -> query (above), and
    # not those of the defaults (0.05, both directions).
    got = fn(["a", "b", "c"], **_two_products())
    assert got == pytest.approx(_logprob("completion_to_query"))
    assert got != pytest.approx(resolve_reward("retrieval_logprob", {})(["a", "b", "c"], **_two_products()))
    with pytest.raises(RewardError, match=re.escape("Reward 'retrieval_logprob' rejected args")):
        resolve_reward("retrieval_logprob", {"direction": "sideways"})
    with pytest.raises(RewardError, match=re.escape("candidate_mask cannot be set in args")):
        resolve_reward("retrieval_rank", {"candidate_mask": None})


# --- format ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "truncated", "expected"),
    [
        ("<think>A red wool scarf.</think>", False, 1.0),
        ("\n<think>\nmulti\nline\n</think>\n\n", False, 1.0),
        ("<think>A red wool scarf.</think>", True, 0.0),  # cut by the length limit
        ("<think></think>", False, 0.0),  # empty
        ("<think>  \n </think>", False, 0.0),  # blank
        ("<think>a <think>b</think> c</think>", False, 0.0),  # nested
        ("<think>a</think><think>b</think>", False, 0.0),  # two blocks
        ("<think>a</think> b</think>", False, 0.0),  # extra closing tag
        ("<think>a</think> the answer", False, 0.0),  # text after the block
        ("before <think>a</think>", False, 0.0),  # text before the block
        ("<think>never closed", False, 0.0),
        ("no tags at all", False, 0.0),
        ("", False, 0.0),
    ],
)
def test_format_table(completion, truncated, expected):
    fmt = FormatReward()
    assert fmt([completion], truncated=[truncated]) == [expected]
    # The same completion in TRL's conversational form.
    assert fmt([[{"role": "assistant", "content": completion}]], truncated=[truncated]) == [expected]


def test_format_without_truncated_flags_treats_nothing_as_truncated():
    assert FormatReward()(["<think>a</think>", "b"]) == [1.0, 0.0]


def test_format_reads_multipart_content():
    completion = [
        {"role": "assistant", "content": [{"type": "text", "text": "<think>a"}, {"type": "text", "text": "</think>"}]}
    ]
    assert FormatReward()([completion]) == [1.0]


# --- attribute_recall -----------------------------------------------------------------------------------------------


def test_attribute_recall_exact_fractions():
    completions = [
        "<think>A RED scarf in navy  blue, size 100%.</think>",
        "<think>A redwood box.</think>",
        "<think>anything</think>",
        "<think>anything</think>",
        [{"role": "assistant", "content": "<think>Wool, red.</think>"}],
    ]
    attributes = [
        {"color": "red", "trim": "navy blue", "fill": "100%", "material": "wool"},  # 3 of 4
        {"color": "red", "material": "oak"},  # "red" must not match "redwood"
        {},
        None,
        {"color": "red", "material": "wool", "size": None, "brand": " "},  # struct padding and blanks are skipped
    ]
    assert attribute_recall(completions, attributes=attributes) == [0.75, 0.0, None, None, 1.0]


def test_attribute_recall_two_of_four_is_a_half():
    attributes = [{"color": "red", "material": "wool", "size": "XL", "brand": "Acme"}]
    assert attribute_recall(["<think>Acme makes this red thing.</think>"], attributes=attributes) == [0.5]


def test_attribute_recall_without_an_attributes_column_is_none():
    assert attribute_recall(["<think>a</think>", "b"], prompts=["p", "q"]) == [None, None]


def test_attribute_recall_does_not_match_the_think_tag():
    assert attribute_recall(["<think>blue</think>"], attributes=[{"style": "think"}]) == [0.0]


# --- length ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "truncated", "expected"),
    [(0, False, 1.0), (4, False, 1.0), (5, False, 0.75), (6, False, 0.5), (8, False, 0.0), (20, False, 0.0)]
    + [(3, True, -2.0), (20, True, -2.0)],
)
def test_length_budget_and_truncation_penalty(tokens, truncated, expected):
    length = Length(budget=4, penalty=2.0)
    assert length(["x"], completion_ids=[list(range(tokens))], truncated=[truncated]) == [expected]


def test_length_reads_tensor_ids_and_defaults():
    assert Length()(["x", "y"], completion_ids=[torch.arange(64), torch.arange(96)]) == [1.0, 0.5]


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"budget": 0}, "budget"), ({"budget": 2.5}, "budget"), ({"penalty": -1}, "penalty")]
)
def test_length_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Length(**kwargs)


# --- registry: names ------------------------------------------------------------------------------------------------


def test_builtins_are_registered_on_import():
    assert set(BUILTINS) <= set(available_rewards())


def test_decorator_registers_functions_and_classes():
    @rewards.reward("test_constant")
    def constant(completions, **kwargs):
        return [0.25] * len(completions)

    @rewards.reward("test_scaled")
    class Scaled:
        def __init__(self, scale: float = 1.0):
            self.scale = scale

        def __call__(self, completions, **kwargs):
            return [self.scale] * len(completions)

    assert {"test_constant", "test_scaled"} <= set(available_rewards())
    assert resolve_reward("test_constant")(["a"]) == [0.25]
    scaled = resolve_reward("test_scaled", {"scale": 3.0})
    assert isinstance(scaled, Scaled) and scaled(["a", "b"]) == [3.0, 3.0]
    assert scaled.__name__ == "test_scaled"


def test_duplicate_name_is_an_error():
    @rewards.reward("test_taken")
    def first(completions, **kwargs):
        return []

    with pytest.raises(RewardError, match=re.escape("'test_taken' is already registered by")):

        @rewards.reward("test_taken")
        def second(completions, **kwargs):
            return []


def test_registering_the_same_function_again_is_allowed():
    # A module reload re-runs its decorators with new objects of the same qualified name.
    def fn(completions, **kwargs):
        return []

    rewards.reward("test_reloaded")(fn)
    rewards.reward("test_reloaded")(functools.wraps(fn)(lambda completions, **kwargs: []))


@pytest.mark.parametrize("bad", ["", "a:b", None])
def test_registered_names_must_be_plain(bad):
    with pytest.raises(RewardError, match="Reward name must be"):
        rewards.reward(bad)


def test_unknown_name_lists_available_rewards_and_suggests_the_closest():
    with pytest.raises(RecipeError) as info:
        resolve_reward("retreival_rank")
    message = str(info.value)
    assert "Unknown reward 'retreival_rank'. Did you mean 'retrieval_rank'?" in message
    assert f"Available rewards: {', '.join(sorted(available_rewards()))}." in message
    assert "'package.module:fn' or 'path/to/file.py:fn'" in message


def test_dotted_name_without_colon_suggests_the_module_form():
    with pytest.raises(RewardError, match=re.escape("write my_pkg.scores:fn")):
        resolve_reward("my_pkg.scores.fn")


# --- registry: modules, files, entry points -------------------------------------------------------------------------

USER_REWARDS = """
from moon_rl.rewards import reward


def keyword_count(completions, keyword="red", **kwargs):
    return [float(str(c).count(keyword)) for c in completions]


class Scaled:
    def __init__(self, scale=1.0):
        self.scale = scale

    def __call__(self, completions, **kwargs):
        return [self.scale] * len(completions)


def no_kwargs(completions):
    return [0.0] * len(completions)


NOT_CALLABLE = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module `moon_rl_test_user_rewards` importable from tmp_path."""
    name = "moon_rl_test_user_rewards"
    (tmp_path / f"{name}.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_module_colon_function(user_module):
    fn = resolve_reward(f"{user_module}:keyword_count", {"keyword": "b"})
    assert fn(["abb", "a"]) == [2.0, 0.0]
    assert fn.__name__ == "keyword_count"
    scaled = resolve_reward(f"{user_module}:Scaled", {"scale": 2})
    assert scaled(["a"]) == [2] and scaled.__name__ == "Scaled"
    assert pickle.loads(pickle.dumps(fn))(["b"]) == [1.0]


def test_module_errors(user_module):
    with pytest.raises(RewardError, match=re.escape("Cannot import module 'no_such_module_xyz'")):
        resolve_reward("no_such_module_xyz:fn")
    with pytest.raises(RewardError, match=re.escape("has no function 'keyword_cont'. Did you mean 'keyword_count'?")):
        resolve_reward(f"{user_module}:keyword_cont")
    with pytest.raises(RewardError, match="is not callable"):
        resolve_reward(f"{user_module}:NOT_CALLABLE")
    with pytest.raises(RewardError, match=re.escape("must accept **kwargs")):
        resolve_reward(f"{user_module}:no_kwargs")


def test_file_colon_function_relative_to_base_dir(tmp_path):
    folder = tmp_path / "recipes"
    (folder / "shared").mkdir(parents=True)
    (folder / "shared" / "team.py").write_text(USER_REWARDS)
    fn = resolve_reward("shared/team.py:keyword_count", {"keyword": "z"}, base_dir=folder)
    assert fn(["zz"]) == [2.0] and fn.__name__ == "keyword_count"
    # The absolute form, and a second load reuses the module (same function object).
    again = resolve_reward(f"{folder / 'shared' / 'team.py'}:keyword_count")
    assert again.func is fn.func
    assert pickle.loads(pickle.dumps(fn))(["z"]) == [1.0]


def test_file_with_the_same_stem_in_two_folders_loads_both(tmp_path):
    for sub, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "r.py").write_text(f"def score(completions, **kwargs):\n    return [{value}]\n")
    assert resolve_reward("a/r.py:score", base_dir=tmp_path)(["x"]) == [1.0]
    assert resolve_reward("b/r.py:score", base_dir=tmp_path)(["x"]) == [2.0]


def test_file_errors_name_the_file_and_function(tmp_path):
    (tmp_path / "ok.py").write_text(USER_REWARDS)
    (tmp_path / "broken.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "syntax.py").write_text("def f(:\n")
    with pytest.raises(
        RewardError,
        match=re.escape(
            f"Reward file 'missing.py' (from 'missing.py:fn') does not exist: looked for {tmp_path / 'missing.py'}"
        ),
    ):
        resolve_reward("missing.py:fn", base_dir=tmp_path)
    with pytest.raises(RewardError, match=re.escape("File 'ok.py' has no function 'nope'")):
        resolve_reward("ok.py:nope", base_dir=tmp_path)
    with pytest.raises(
        RewardError,
        match=re.escape(
            f"Reward file {tmp_path / 'broken.py'} (from 'broken.py:f') failed to import: ModuleNotFoundError"
        ),
    ):
        resolve_reward("broken.py:f", base_dir=tmp_path)
    with pytest.raises(RewardError, match="failed to import: SyntaxError"):
        resolve_reward("syntax.py:f", base_dir=tmp_path)
    # A failed import leaves nothing behind: fixing the file makes the next resolve succeed.
    (tmp_path / "broken.py").write_text("def f(completions, **kwargs):\n    return [1.0]\n")
    assert resolve_reward("broken.py:f", base_dir=tmp_path)(["x"]) == [1.0]


def _fake_entry_points(*points: importlib.metadata.EntryPoint):
    def entry_points(**params):
        assert params == {"group": "moon_rl.rewards"}
        return importlib.metadata.EntryPoints(points)

    return entry_points


def test_entry_point_resolution(user_module, monkeypatch):
    point = importlib.metadata.EntryPoint("team_keywords", f"{user_module}:keyword_count", "moon_rl.rewards")
    broken = importlib.metadata.EntryPoint("team_broken", "no_such_module_xyz:fn", "moon_rl.rewards")
    monkeypatch.setattr(importlib.metadata, "entry_points", _fake_entry_points(point, broken))
    assert {"team_keywords", "team_broken"} <= set(available_rewards())
    fn = resolve_reward("team_keywords", {"keyword": "q"})
    assert fn(["qq"]) == [2.0] and fn.__name__ == "team_keywords"
    with pytest.raises(RewardError, match=re.escape("Entry point 'team_broken' ('no_such_module_xyz:fn', group")):
        resolve_reward("team_broken")


def test_registry_wins_over_entry_points(user_module, monkeypatch):
    point = importlib.metadata.EntryPoint("format", f"{user_module}:keyword_count", "moon_rl.rewards")
    monkeypatch.setattr(importlib.metadata, "entry_points", _fake_entry_points(point))
    assert isinstance(resolve_reward("format"), FormatReward)


# --- registry: the import path before issue 15 ---------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
#: A user's reward written when the package installed as the top-level `rewards`.
OLD_STYLE_REWARDS = """
from rewards import reward


@reward("old_style")
def old_style(completions, **kwargs):
    return [1.0] * len(completions)
"""
ADVICE = "write `from moon_rl.rewards import reward`"


@pytest.fixture(params=["checkout", "absent", "another distribution"])
def old_import_path(request, tmp_path, monkeypatch):
    """Where `import rewards` leads: the repository's folder (Python run from its root), nowhere (moon-rl installed
    from a wheel), or another distribution named `rewards` (PyPI has one)."""
    away = [entry for entry in sys.path if Path(entry or os.getcwd()).resolve() != ROOT]
    if request.param == "checkout":
        away.insert(0, str(ROOT))
    elif request.param == "another distribution":
        (tmp_path / "site" / "rewards").mkdir(parents=True)
        (tmp_path / "site" / "rewards" / "__init__.py").write_text('"""Not moon-rl\'s."""\n')
        away.insert(0, str(tmp_path / "site"))
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "moon_rl_test_old_style.py").write_text(OLD_STYLE_REWARDS)
    away.insert(0, str(tmp_path / "plugins"))
    monkeypatch.setattr(sys, "path", away)
    monkeypatch.delitem(sys.modules, "rewards", raising=False)
    importlib.invalidate_caches()
    yield request.param
    for name in [name for name in sys.modules if name == "rewards" or name.startswith("rewards.")]:
        del sys.modules[name]


def test_the_repository_folder_refuses_its_old_name():
    # From the repository's root the folder is importable as `rewards`: a second copy of the registry, which a reward
    # would register into unseen. It refuses instead, under either spelling.
    code = "import rewards.registry"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 1 and "ImportError" in result.stderr and ADVICE in result.stderr, result.stderr


def test_a_reward_on_the_old_import_path_is_told_the_new_one(old_import_path, tmp_path, monkeypatch):
    (tmp_path / "old_style.py").write_text(OLD_STYLE_REWARDS)
    with pytest.raises(RewardError, match=re.escape(ADVICE)) as info:
        resolve_reward("old_style.py:old_style", base_dir=tmp_path)
    assert "(from 'old_style.py:old_style') failed to import" in str(info.value)
    with pytest.raises(RewardError, match=re.escape(ADVICE)):
        resolve_reward("moon_rl_test_old_style:old_style")
    with pytest.raises(RewardError, match=re.escape(ADVICE)):  # a built-in named by its old module
        resolve_reward("rewards.text:FormatReward")
    point = importlib.metadata.EntryPoint("team_old", "moon_rl_test_old_style:old_style", "moon_rl.rewards")
    monkeypatch.setattr(importlib.metadata, "entry_points", _fake_entry_points(point))
    with pytest.raises(RewardError, match=re.escape(ADVICE)):
        resolve_reward("team_old")
    # Nothing half-registered: not in the registry, no stray copy of the package.
    assert "old_style" not in registry_module._REGISTRY
    assert "rewards" not in sys.modules or old_import_path == "another distribution"


def test_other_import_errors_get_no_advice_about_rewards(tmp_path):
    (tmp_path / "needs.py").write_text("import rewards_helpers_xyz\n")
    with pytest.raises(RewardError, match="No module named 'rewards_helpers_xyz'") as info:
        resolve_reward("needs.py:f", base_dir=tmp_path)
    assert "moon_rl.rewards" not in str(info.value)


# --- registry: args, names, pickling --------------------------------------------------------------------------------


def test_args_are_bound_as_keywords():
    margin = resolve_reward("retrieval_margin", {"temperature": 1e-4})
    assert margin.temperature == 1e-4
    assert margin(["a", "b", "c"], **_retrieval_batch()) == pytest.approx([0.2, -0.2, -0.8], abs=1e-6)
    length = resolve_reward("length", {"budget": 2, "penalty": 0.5})
    assert length(["a", "b"], completion_ids=[[1, 2, 3], [1]], truncated=[False, True]) == [0.5, -0.5]


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        (
            "retrieval_margin",
            {"temprature": 0.1},
            "Reward 'retrieval_margin' has no argument 'temprature'; valid args: temperature.",
        ),
        ("retrieval_rank", {"k": 1}, "Reward 'retrieval_rank' has no argument 'k'; valid args: none."),
        ("format", {"strict": True}, "Reward 'format' has no argument 'strict'; valid args: none."),
        ("retrieval_rank", {"embeddings": 1}, "embeddings cannot be set in args; the trainer passes it on every call."),
        ("length", {"budget": -3}, "Reward 'length' rejected args {'budget': -3}: `budget` must be a positive integer"),
    ],
)
def test_bad_args_are_errors_naming_the_reward_and_valid_args(name, args, message):
    with pytest.raises(RewardError, match=re.escape(message)):
        resolve_reward(name, args)


@pytest.mark.parametrize("name", BUILTINS)
def test_bound_builtins_have_readable_names_and_pickle(name):
    args = {"retrieval_margin": {"temperature": 0.1}, "length": {"budget": 8}}.get(name, {})
    fn = resolve_reward(name, args)
    restored = pickle.loads(pickle.dumps(fn))
    assert fn.__name__ == restored.__name__ == name
    batch = {
        "embeddings": torch.tensor([[0.6, 0.8]]),
        "candidates": torch.eye(2),
        "positive_index": torch.tensor([0]),
        "completion_ids": [[1]],
        "attributes": [{"c": "red"}],
    }
    assert restored(["<think>red</think>"], **batch) == fn(["<think>red</think>"], **batch)


def test_trl_logs_bound_builtins_under_their_registered_names():
    from trl.trainer.utils import get_callable_name

    assert [get_callable_name(resolve_reward(n, {})) for n in BUILTINS] == BUILTINS


def test_build_rewards_weights_defaults_and_duplicate_names():
    from trl.trainer.utils import get_callable_name

    built = build_rewards(
        [
            {"name": "retrieval_rank"},
            {"name": "length", "weight": -0.5, "args": {"budget": 16}},
            {"name": "length", "weight": 2, "args": {"budget": 32}},
        ]
    )
    assert all(isinstance(entry, RewardEntry) for entry in built)
    assert [(entry.name, entry.fn.__name__, entry.weight) for entry in built] == [
        ("retrieval_rank", "retrieval_rank", 1.0),
        ("length", "length", -0.5),
        ("length_2", "length_2", 2.0),
    ]
    assert [entry.fn.budget for entry in built[1:]] == [16, 32]
    # TRL logs `rewards/<get_callable_name(fn)>/mean`: the same names, so the two budgets' logs stay apart.
    assert [get_callable_name(entry.fn) for entry in built] == ["retrieval_rank", "length", "length_2"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        built[0].weight = 3.0


def test_build_rewards_names_duplicate_functions_as_trl_logs_them(tmp_path):
    # A function is bound with functools.partial, which TRL logs by the wrapped function's name: a second entry of the
    # same function is wrapped so that TRL, too, logs it as `score_2`, and it still pickles and scores.
    from trl.trainer.utils import get_callable_name

    (tmp_path / "team.py").write_text(
        "def score(completions, scale=1.0, **kwargs):\n    return [scale] * len(completions)\n"
    )
    built = build_rewards(
        [
            {"name": "team.py:score"},
            {"name": "team.py:score", "args": {"scale": 2.0}},
            {"name": "retrieval_rank"},
            {"name": "retrieval_rank"},
        ],
        base_dir=tmp_path,
    )
    names = [entry.name for entry in built]
    assert names == ["score", "score_2", "retrieval_rank", "retrieval_rank_2"]
    assert [entry.fn.__name__ for entry in built] == names
    assert [get_callable_name(entry.fn) for entry in built] == names
    restored = pickle.loads(pickle.dumps(built[1].fn))
    assert restored.__name__ == "score_2" and restored(["a"]) == [2.0]
    assert built[0].fn(["a"]) == [1.0]


def test_build_rewards_suffixes_never_take_another_entrys_name(tmp_path):
    (tmp_path / "team.py").write_text("def length_2(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    entries = [{"name": "length"}, {"name": "length"}, {"name": "team.py:length_2"}]
    built = build_rewards(entries, base_dir=tmp_path)
    assert [entry.name for entry in built] == ["length", "length_3", "length_2"]
    assert [entry.fn.__name__ for entry in built] == ["length", "length_3", "length_2"]


def test_build_rewards_reports_every_bad_entry_at_once():
    with pytest.raises(RewardError) as info:
        build_rewards(
            [
                {"name": "retrieval_rank"},
                {"name": "formt"},
                {"name": "length", "weight": "heavy"},
                {"name": "retrieval_margin", "args": {"tau": 1}},
                "format",
            ]
        )
    lines = str(info.value).splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "rewards[1] (formt)",
        "rewards[2] (length)",
        "rewards[3] (retrieval_margin)",
        "rewards[4]",
    ]
    assert "Did you mean 'format'?" in lines[0]


def test_rewards_do_not_import_the_training_package():
    # Rewards are pure functions of tensors and columns, testable without the trainers; a fresh interpreter shows what
    # `import moon_rl.rewards` really pulls in.
    code = ("import sys, moon_rl.rewards; "
            "print(sorted(m for m in sys.modules if m.startswith('moon_rl') and not m.startswith('moon_rl.rewards')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['moon_rl', 'moon_rl.errors']"


@pytest.mark.parametrize("module", [registry_module, retrieval_module, text_module])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
