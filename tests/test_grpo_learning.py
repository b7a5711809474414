"""GRPO learns from its rewards: a reward for one token raises its frequency, weights reach the logged total, and a
buffered batch can be trained on twice (`num_iterations: 2`)."""

from __future__ import annotations

import json

import pytest
import torch

from moon_rl.recipe import load_recipe
from tests.helpers import tiny_recipe


def grpo_recipe(tmp_path, *overrides: str):
    path = tmp_path / "grpo.yaml"
    path.write_text(tiny_recipe(
        grpo={"allow_untrained_reasoning": True, "per_device_train_batch_size": 8, "num_generations": 4,
              "max_completion_length": 16, "learning_rate": 1.0e-2, "beta": 0.0, "max_steps": 30, "save_steps": 100,
              "temperature": 1.0, "min_distinct_anchors": 2, "contrastive_weight": 0.0, "seed": 0},
        eval={}))
    return load_recipe(path, [f"output_dir={tmp_path / 'run'}", *overrides])


def build(recipe, rewards):
    """A trainer on the tiny model (the same initial weights every call) and a few products' prompts to sample."""
    from moon_rl.data.catalogue import load_recipe_catalogue
    from moon_rl.modeling.embedder import MoonEmbedder
    from moon_rl.modeling.inputs import to_item
    from moon_rl.training.grpo import MoonGRPOTrainer, catalogue_images, grpo_dataset
    from moon_rl.training.sft_data import sft_examples

    catalogue = load_recipe_catalogue(recipe.data)
    examples = sft_examples(catalogue, "train")
    torch.manual_seed(0)
    embedder = MoonEmbedder.from_recipe(recipe).train()
    trainer = MoonGRPOTrainer(
        embedder, rewards, recipe.grpo_config(),
        query_item=lambda pair: to_item(examples[pair].anchor, catalogue.image, embedder.max_images),
        pair_products=[ex.positive for ex in examples], heads_learning_rate=1e-3,
        train_dataset=grpo_dataset(embedder, catalogue, examples), product_images=catalogue_images(embedder, catalogue),
    )
    # Every training product: the token is chosen, and its rate measured, over the prompts GRPO trains on (a token
    # frequent in a handful of them may never be sampled in training, and then nothing moves).
    products = sorted({ex.positive for ex in examples})
    items = [to_item(catalogue.products[pid], catalogue.image, embedder.max_images) for pid in products]
    return trainer, items


def samples(trainer, items, rounds: int = 2) -> list[list[int]]:
    """Completions sampled as GRPO samples them (temperature 1), from fixed seeds."""
    out = []
    with torch.random.fork_rng(devices=[]):
        for seed in range(rounds):
            torch.manual_seed(seed)
            out += trainer.embedder.generate_reasoning(items, do_sample=True, temperature=1.0, max_new_tokens=16)
    return out


def rate(completions: list[list[int]], token: int) -> float:
    return sum(ids.count(token) for ids in completions) / max(sum(map(len, completions)), 1)


@pytest.mark.slow
def test_a_reward_for_one_token_raises_its_frequency_and_a_flat_reward_does_not(tmp_path):
    from moon_rl.rewards import RewardEntry

    def flat(completions, **kwargs):
        return [0.0] * len(completions)

    control, items = build(grpo_recipe(tmp_path, f"output_dir={tmp_path / 'flat'}"), [RewardEntry("flat", flat, 1.0)])
    initial = samples(control, items)
    # The random-init model's most frequent token, so that sampled groups disagree about it from the first step.
    token = max(set(sum(initial, [])), key=lambda t: rate(initial, t))

    def prefers(completions, completion_ids, **kwargs):
        return [ids.count(token) / max(len(ids), 1) for ids in completion_ids]

    control.train()
    trainer, _ = build(grpo_recipe(tmp_path, f"output_dir={tmp_path / 'prefers'}"), [RewardEntry("prefers", prefers, 1.0)])
    assert rate(samples(trainer, items), token) == rate(initial, token)  # the same start
    trainer.train()
    before, flat_after, after = rate(initial, token), rate(samples(control, items), token), rate(samples(trainer, items), token)
    assert flat_after == before  # zero advantage: no policy gradient, nothing moves
    assert after > before + 0.3, (before, after)  # measured: 0.008 -> 0.998


@pytest.mark.slow
def test_logged_reward_is_the_weighted_sum_and_num_iterations_two_trains(tmp_path):
    from moon_rl.rewards import RewardEntry

    def length(completions, completion_ids, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    def first_token(completions, completion_ids, **kwargs):
        return [float(ids[0] % 7) if ids else 0.0 for ids in completion_ids]

    recipe = grpo_recipe(tmp_path, "grpo.max_steps=4", "grpo.num_iterations=2", "grpo.contrastive_weight=0.5")
    trainer, _ = build(recipe, [RewardEntry("length", length, 0.5), RewardEntry("first", first_token, -2.0)])
    trainer.train()  # num_iterations 2: TRL trains twice on each buffered generation batch
    logged = [e for e in trainer.state.log_history if "reward" in e]
    assert len(logged) >= 2
    for entry in logged:
        expected = 0.5 * entry["rewards/length/mean"] - 2.0 * entry["rewards/first/mean"]
        assert entry["reward"] == pytest.approx(expected, abs=1e-4)
    assert all("infonce" in e for e in logged)
    json.dumps(trainer.state.log_history)  # every logged value is plain data
