"""GRPO's preflight: a starting model that cannot close its think block, or never saw a trace, is refused."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from moon_rl.errors import MoonError
from moon_rl.modeling.embedder import MoonEmbedder
from moon_rl.modeling.inputs import to_item
from moon_rl.recipe import Recipe, load_recipe
from moon_rl.training.preflight import PreflightReport, check_can_learn, reasoning_preflight
from tests.helpers import TINY_SFT, tiny_recipe

CLOSED = "<think>category shirt.</think>"
# Short budgets keep the real sampling of the untrained model to a few seconds on two CPU cores.
BUDGET = 16


def recipe_at(tmp_path, *overrides: str) -> Recipe:
    path = tmp_path / "recipe.yaml"
    path.write_text(tiny_recipe(tmp_path / "run", sft={**TINY_SFT, "max_steps": 1, "save_steps": 1}, eval={}))
    return load_recipe(path, list(overrides))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An untrained tiny embedder (random backbone) and 8 of the synthetic catalogue's products as GRPO items."""
    from moon_rl.data.catalogue import load_recipe_catalogue

    recipe = recipe_at(tmp_path_factory.mktemp("preflight"))
    embedder = MoonEmbedder.from_recipe(recipe).train()
    catalogue = load_recipe_catalogue(recipe.data)
    items = [to_item(p, catalogue.image, embedder.max_images) for p in list(catalogue.products.values())[:8]]
    return embedder, items


def preflight(embedder, items, **kwargs) -> PreflightReport:
    kwargs = {"catalogue_has_traces": True, "max_new_tokens": BUDGET, "temperature": 1.0, **kwargs}
    return reasoning_preflight(embedder, items, **kwargs)


def fake_generation(monkeypatch, embedder, texts: list[str]) -> None:
    """`generate_reasoning` returns the ids of `texts` in turn, one per item, as the HF backend would (no end of turn)."""
    tok = embedder.processor.tokenizer
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    calls = iter(range(10_000))

    def generate(items, **kwargs):
        return [ids[next(calls) % len(ids)] for _ in items]

    monkeypatch.setattr(embedder, "generate_reasoning", generate)


def test_untrained_model_is_refused_with_the_fixes_and_allowed_with_a_warning(setup, caplog):
    # Catches: GRPO silently training on truncated chains (the 240-step run), or a message without the way out.
    embedder, items = setup
    report = preflight(embedder, items)
    assert report.sampled == 8 and report.closed_share < 0.5 and report.example
    with pytest.raises(MoonError) as err:
        check_can_learn(report, allow=False)
    message = str(err.value)
    assert "\n" not in message
    assert f"never close </think> within grpo.max_completion_length={BUDGET} tokens" in message
    assert "grpo.allow_untrained_reasoning: true" in message and "moon-rl sft" in message
    with caplog.at_level(logging.WARNING, logger="moon_rl.training.preflight"):
        check_can_learn(report, allow=True)
    assert any(r.levelno == logging.WARNING and "never close" in r.getMessage() for r in caplog.records)


def test_preflight_leaves_the_global_rng_and_module_modes_as_found(setup):
    # Catches: the preflight's sampling shifting the training run's random stream (seeded runs stop reproducing), a
    # non-fixed seed (the verdict changes run to run), and a model left in eval mode (dropout off during training).
    embedder, items = setup
    embedder.train()
    embedder.heads.eval()  # a mixed state must come back exactly, not as a blanket train()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    first = preflight(embedder, items[:4], max_new_tokens=8)
    assert torch.equal(torch.get_rng_state(), before)
    assert embedder.model.training and not embedder.heads.training
    second = preflight(embedder, items[:4], max_new_tokens=8)
    assert (second.closed_share, second.example) == (first.closed_share, first.example)
    embedder.train()


def test_model_that_closes_its_think_block_passes_when_traces_exist(setup, monkeypatch):
    # Catches: a refusal of a healthy SFT model (a preflight that blocks every GRPO run).
    embedder, items = setup
    fake_generation(monkeypatch, embedder, [CLOSED])
    report = preflight(embedder, items)
    assert report.closed_share == 1.0 and report.problems == []
    check_can_learn(report, allow=False)


@pytest.mark.parametrize(("reasoning_trained", "refused"), [(None, True), (False, True), (True, False)])
def test_catalogue_without_traces_needs_a_reasoning_trained_model(setup, monkeypatch, reasoning_trained, refused):
    # Catches: GRPO from the base model on a trace-less catalogue (the chains close but say nothing learnt), and
    # refusing a model whose SFT did train the reasoning.
    embedder, items = setup
    fake_generation(monkeypatch, embedder, [CLOSED])
    monkeypatch.setitem(embedder.meta, "reasoning_trained", reasoning_trained)
    report = preflight(embedder, items, catalogue_has_traces=False)
    assert report.closed_share == 1.0
    if refused:
        with pytest.raises(MoonError, match=re.escape("the catalogue has no reasoning traces and the starting model "
                                                      "was not SFT-trained on traces")):
            check_can_learn(report, allow=False)
    else:
        assert report.problems == []
        check_can_learn(report, allow=False)


def test_closed_share_is_exact_and_a_completion_at_the_budget_is_not_closed(setup, monkeypatch):
    # Catches: counting `</think>` alone (a chain that closes, then rambles until the budget, never ends its turn and
    # gives GRPO no read-out at the end-of-turn token), and an off-by-one at the budget.
    embedder, items = setup
    tok = embedder.processor.tokenizer
    budget = len(tok(CLOSED + " colour red.", add_special_tokens=False)["input_ids"])
    fake_generation(monkeypatch, embedder, [CLOSED, CLOSED, "<think>category shirt.", CLOSED])
    report = preflight(embedder, items[:4], max_new_tokens=budget)
    assert (report.sampled, report.closed_share) == (4, 0.75) and report.problems == []
    assert report.example == "<think>category shirt."
    # The same closed chain, then words up to exactly the budget: truncated, so not closed.
    fake_generation(monkeypatch, embedder, [CLOSED, CLOSED + " colour red.", CLOSED + " colour red.", CLOSED])
    report = preflight(embedder, items[:4], max_new_tokens=budget)
    assert report.closed_share == 0.5 and report.problems == []
    report = preflight(embedder, items[:4], max_new_tokens=budget, min_closed=0.6)
    assert report.problems == ["2 of 4 sampled completions never close </think> within "
                               f"grpo.max_completion_length={budget} tokens"]


@pytest.mark.parametrize("reasoning_trained", [True, False])
def test_save_load_keeps_reasoning_trained(setup, tmp_path, reasoning_trained):
    # Catches: the flag lost on save or load, so GRPO after a trace-less SFT run is never (or always) refused.
    embedder, _ = setup
    embedder.meta["reasoning_trained"] = reasoning_trained
    try:
        embedder.save(tmp_path / "m")
    finally:
        embedder.meta.pop("reasoning_trained")
    assert json.loads((tmp_path / "m" / "moon_rl.json").read_text())["reasoning_trained"] is reasoning_trained
    assert MoonEmbedder.load(tmp_path / "m").meta["reasoning_trained"] is reasoning_trained


def test_older_manifest_without_the_key_loads_as_unknown(setup, tmp_path):
    # Catches: a KeyError on model folders saved before the flag existed.
    embedder, _ = setup
    embedder.save(tmp_path / "m")
    manifest_path = tmp_path / "m" / "moon_rl.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["reasoning_trained"] is None  # never set: unknown
    del manifest["reasoning_trained"]
    manifest_path.write_text(json.dumps(manifest))
    assert MoonEmbedder.load(tmp_path / "m").meta["reasoning_trained"] is None


@pytest.mark.parametrize(("override", "expected"), [("sft.reasoning=true", True), ("sft.reasoning=false", False)])
def test_sft_records_whether_it_trained_the_reasoning(tmp_path, override, expected):
    # Catches: run_sft not recording the flag, or recording True when `sft.reasoning: false` ignored the traces.
    from moon_rl.training.sft import run_sft

    final = run_sft(recipe_at(tmp_path, override))
    assert json.loads((final / "moon_rl.json").read_text())["reasoning_trained"] is expected
