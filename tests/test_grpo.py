"""MoonGRPOTrainer: reward and loss see the same embedding, rewards get moon-rl's context, heads never reach vLLM."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from moon_rl.recipe import load_recipe
from tests.helpers import TINY_GRPO, tiny_recipe


def grpo_recipe(tmp_path, *overrides: str):
    path = tmp_path / "grpo.yaml"
    path.write_text(tiny_recipe(
        grpo={**TINY_GRPO, "learning_rate": 1.0e-3, "save_steps": 100, "temperature": 1.0,
              "rewards": [{"name": "retrieval_rank"}], "contrastive_weight": 0.5},
        eval={}))
    return load_recipe(path, [f"output_dir={tmp_path / 'run'}", *overrides])


class RecordingReward:
    """Retrieval rank, and remembers what it was called with."""

    __name__ = "recording"

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, completions, embeddings, candidates, positive_index, **kwargs):
        self.calls.append({"embeddings": embeddings.clone(), "candidates": candidates, "positive_index": positive_index,
                           **kwargs})
        scores = embeddings @ candidates.T
        positive = scores.gather(1, positive_index[:, None])
        return (1.0 / (1 + (scores > positive).sum(1)).float()).tolist()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from moon_rl.data.catalogue import load_recipe_catalogue
    from moon_rl.modeling.embedder import MoonEmbedder
    from moon_rl.modeling.inputs import to_item
    from moon_rl.rewards import RewardEntry
    from moon_rl.training.grpo import MoonGRPOTrainer
    from moon_rl.training.grpo_data import catalogue_images, grpo_dataset
    from moon_rl.training.sft_data import sft_examples

    tmp = tmp_path_factory.mktemp("grpo")
    recipe = grpo_recipe(tmp)
    catalogue = load_recipe_catalogue(recipe.data)
    examples = sft_examples(catalogue, "train")
    embedder = MoonEmbedder.from_recipe(recipe).train()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # exercise fusion and FIRE: fresh ones are the identity
        for name, param in embedder.heads.named_parameters():
            if name.startswith(("fusion.out", "fire.up")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    reward = RecordingReward()
    trainer = MoonGRPOTrainer(
        embedder, [RewardEntry("recording", reward, 1.0)], recipe.grpo_config(),
        query_item=lambda pair: to_item(examples[pair].anchor, catalogue.image, embedder.max_images),
        heads_learning_rate=1e-3, train_dataset=grpo_dataset(embedder, catalogue, examples),
        product_images=catalogue_images(embedder, catalogue),
    )
    return SimpleNamespace(recipe=recipe, trainer=trainer, reward=reward, examples=examples, catalogue=catalogue)


def generation_batch(setup, pairs):
    dataset = setup.trainer.train_dataset
    return [dataset[p] for p in pairs for _ in range(setup.trainer.num_generations)]


def test_rewards_receive_embeddings_candidates_and_columns(setup):
    setup.reward.calls.clear()
    output = setup.trainer._generate_and_score_completions(generation_batch(setup, [0, 1, 2, 3]))
    call = setup.reward.calls[-1]
    assert call["embeddings"].shape == (8, 32)
    # The 4 distinct queries of the generation batch first, then the queue (filled with training queries up front).
    n_pairs = len(setup.trainer.train_dataset)
    assert call["candidates"].shape == (4 + min(256, n_pairs) - 4, 32)
    assert call["positive_index"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert call["candidate_mask"].shape == (8, call["candidates"].shape[0]) and call["candidate_mask"][:, :4].all()
    assert len(call["truncated"]) == 8 and all(isinstance(t, bool) for t in call["truncated"])
    assert call["pair"] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert call["attributes"][0] == setup.catalogue.products[setup.examples[0].positive].attributes
    torch.testing.assert_close(call["candidates"].norm(dim=1), torch.ones(len(call["candidates"])))
    assert output["moon_pair"].tolist() == call["pair"]


def test_reward_and_loss_embeddings_are_the_same_function_of_the_same_tokens(setup):
    trainer = setup.trainer
    setup.reward.calls.clear()
    output = trainer._generate_and_score_completions(generation_batch(setup, [4, 5, 6, 7]))
    seen = {}
    original = trainer.completion_embeddings

    def spy(records, inputs):
        seen["loss"] = original(records, inputs)
        return seen["loss"]

    trainer.completion_embeddings = spy
    trainer.current_gradient_accumulation_steps = 1  # set by `train()`; this test calls the loss directly
    try:
        loss = trainer.compute_loss(trainer.model, dict(output))
    finally:
        trainer.completion_embeddings = original
    assert torch.isfinite(loss)
    reward_embeddings = setup.reward.calls[-1]["embeddings"]
    assert (reward_embeddings - seen["loss"].detach()).abs().max() < 1e-5


@pytest.mark.parametrize("rows", ["advantaged", "all"])
def test_infonce_pulls_only_completions_at_least_as_good_as_their_group(setup, rows):
    trainer = setup.trainer
    output = dict(trainer._generate_and_score_completions(generation_batch(setup, [4, 5, 6, 7])))
    output["advantages"] = torch.tensor([1.0, -1.0, 0.0, 0.0, -0.5, 0.5, 2.0, -2.0])
    seen = {}
    original, setting = trainer._contrastive, trainer.args.contrastive_rows

    def spy(embeddings, pair_ids, *rest):
        seen.update(pairs=pair_ids.tolist(), rows=len(embeddings))
        return original(embeddings, pair_ids, *rest)

    trainer._contrastive, trainer.args.contrastive_rows = spy, rows
    trainer.current_gradient_accumulation_steps = 1
    try:
        loss = trainer.compute_loss(trainer.model, output)
    finally:
        trainer._contrastive, trainer.args.contrastive_rows = original, setting
    assert torch.isfinite(loss)
    keep = (output["advantages"] >= 0).tolist() if rows == "advantaged" else [True] * 8
    assert seen["pairs"] == [p for p, k in zip(output["moon_pair"].tolist(), keep, strict=True) if k]
    assert seen["rows"] == sum(keep)


def test_sibling_term_adds_its_weighted_loss_on_the_shown_rows_with_detached_queries(setup, monkeypatch):
    from moon_rl.training import grpo as moon_grpo

    trainer = setup.trainer
    output = dict(trainer._generate_and_score_completions(generation_batch(setup, [4, 5, 6, 7])))
    output["advantages"] = torch.tensor([1.0, -1.0, 0.0, 0.0, -0.5, 0.5, 2.0, -2.0])
    output["completion_mask"] = output["completion_mask"].clone()
    output["completion_mask"][2] = 0  # masked as truncated: leaves both terms
    seen = {}
    original = moon_grpo.sibling_ranking_loss

    def spy(completions, queries, groups, advantages, **kwargs):
        seen.update(rows=len(completions), groups=groups.tolist(), advantages=advantages.tolist(),
                    queries_grad=queries.requires_grad, completions_grad=completions.requires_grad)
        seen["value"], accuracy = original(completions, queries, groups, advantages, **kwargs)
        return seen["value"], accuracy

    monkeypatch.setattr(moon_grpo, "sibling_ranking_loss", spy)
    trainer.current_gradient_accumulation_steps = 1
    setting = trainer.args.sibling_weight
    try:
        torch.manual_seed(0)
        without = trainer.compute_loss(trainer.model, dict(output))
        trainer.args.sibling_weight = 0.3
        torch.manual_seed(0)
        with_term = trainer.compute_loss(trainer.model, dict(output))
    finally:
        trainer.args.sibling_weight = setting
    shown = [i for i in range(8) if i != 2]
    assert seen["rows"] == 7 and seen["groups"] == [output["moon_pair"].tolist()[i] for i in shown]
    assert seen["advantages"] == [output["advantages"].tolist()[i] for i in shown]
    assert seen["completions_grad"] and not seen["queries_grad"]
    assert seen["value"].item() > 0  # pairs 4, 6 and 7 each have a better and a worse row shown
    assert (with_term - without).item() == pytest.approx(0.3 * seen["value"].item(), rel=1e-4, abs=1e-6)
    assert trainer._metrics["train"]["sibling/loss"][-1] == pytest.approx(seen["value"].item())


def test_reward_forward_processes_each_product_once_and_runs_in_per_device_chunks(setup):
    trainer = setup.trainer
    sizes = []
    original = trainer._tokenize_prompts

    def spy(prompts):
        sizes.append(len(prompts))
        return original(prompts)

    setup.reward.calls.clear()
    trainer._tokenize_prompts = spy
    try:
        trainer._generate_and_score_completions(generation_batch(setup, [4, 5, 6, 7]))
    finally:
        trainer._tokenize_prompts = original
    assert sizes == [8, 4]  # TRL's generation: every row; the reward forward: each of the 4 products once
    call = setup.reward.calls[-1]
    pairs = call["pair"]
    products = [trainer._pair_product(p) for p in pairs]
    arguments = (call["prompts"], call["completion_ids"], sorted(set(pairs)), products)
    whole = trainer._reward_forward(*arguments)
    batch_size = trainer.args.per_device_train_batch_size
    trainer.args.per_device_train_batch_size = 3  # chunks cut through groups and candidate lists alike
    try:
        chunked = trainer._reward_forward(*arguments)
    finally:
        trainer.args.per_device_train_batch_size = batch_size
    torch.testing.assert_close(chunked[0], whole[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(chunked[1], whole[1], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(whole[0], call["embeddings"], atol=2e-5, rtol=1e-4)


def test_truncated_completions_are_read_at_their_last_token_and_flagged(setup):
    setup.reward.calls.clear()
    setup.trainer._generate_and_score_completions(generation_batch(setup, [8, 9, 10, 11]))
    call = setup.reward.calls[-1]
    eos = setup.trainer.eos_token_ids
    for ids, flag in zip(call["completion_ids"], call["truncated"], strict=True):
        assert flag == (ids[-1] not in eos)
    assert any(call["truncated"])  # an untrained model rarely stops within 8 tokens


def test_heads_never_reach_the_weights_synced_to_vllm(setup):
    from trl.generation.vllm_generation import VLLMGeneration

    trainer = setup.trainer
    stub = SimpleNamespace(model=trainer.model,
                           _dist=SimpleNamespace(is_fsdp=False, gather_params=lambda params: nullcontext()))
    stub._fix_param_name_to_vllm = lambda name, extra_prefixes=None: VLLMGeneration._fix_param_name_to_vllm(
        stub, name, extra_prefixes)
    synced = list(VLLMGeneration._iter_named_params(stub))  # TRL's own iterator, no vLLM needed
    assert len(synced) == len(list(trainer.model.parameters()))
    synced_ptrs = {tensor.data_ptr() for _, tensor in synced}
    assert not any(p.data_ptr() in synced_ptrs for p in trainer.embedder.heads.parameters())
    assert not any(part in name for name, _ in synced for part in ("fusion", "fire", "heads"))


def test_heads_have_their_own_optimizer_and_train(setup):
    trainer = setup.trainer
    before = {n: p.detach().clone() for n, p in trainer.embedder.heads.named_parameters()}
    trainer.train()
    heads = {id(p) for p in trainer.embedder.heads.parameters()}
    # Outside the model's optimizer (which FSDP/DeepSpeed checkpoint), in their own, at their own rate.
    assert not any(id(p) in heads for g in trainer.optimizer.param_groups for p in g["params"])
    (group,) = trainer.heads_optimizer.optimizer.param_groups
    assert {id(p) for p in group["params"]} == heads and group["lr"] <= 1e-3
    changed = [n for n, p in trainer.embedder.heads.named_parameters() if not torch.equal(p, before[n])]
    assert "proj.weight" in changed
    logged = [e["heads_grad_norm"] for e in trainer.state.log_history if "heads_grad_norm" in e]
    assert len(logged) == trainer.state.global_step and all(n > 0 for n in logged)  # logging_steps 1
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"infonce", "retrieval/mrr", "rewards/recording/mean", "completions/mean_length"} <= logged


def test_run_grpo_with_a_reward_file_next_to_the_recipe_and_resume(tmp_path):
    import json

    from moon_rl.modeling.folder import HEADS_WEIGHTS
    from moon_rl.training.checkpoint import MARKER_FILE
    from moon_rl.training.grpo import run_grpo

    (tmp_path / "my_rewards.py").write_text(
        "def brevity(completions, completion_ids, **kwargs):\n"
        "    return [1.0 / (1 + len(ids)) for ids in completion_ids]\n"
    )
    grpo_recipe(tmp_path)  # writes grpo.yaml
    (tmp_path / "with_file_reward.yaml").write_text(
        "extends: grpo.yaml\n"
        "grpo: {save_steps: 1, rewards: [{name: 'my_rewards.py:brevity', weight: 0.1}, {name: retrieval_rank}]}\n"
    )

    def recipe(*overrides):
        return load_recipe(tmp_path / "with_file_reward.yaml", [f"output_dir={tmp_path / 'run'}", *overrides])

    final = run_grpo(recipe())  # no SFT model: starts from the base (the recipe allows it)
    out = final.parent
    history = json.loads((out / "log_history.json").read_text())
    logged = {k for entry in history for k in entry}
    assert {"rewards/brevity/mean", "rewards/retrieval_rank/mean", "retrieval/mrr", "infonce"} <= logged
    assert (out / "checkpoint-2" / HEADS_WEIGHTS).is_file() and (out / "checkpoint-2" / MARKER_FILE).is_file()
    # Interrupted after step 2: resume with a longer budget continues at step 3.
    (final / "moon_rl.json").unlink()
    run_grpo(recipe("grpo.max_steps=3"), resume=True)
    steps = [e["step"] for e in json.loads((out / "log_history.json").read_text()) if "loss" in e]
    assert steps == [1, 2, 3]


def test_too_few_distinct_anchors_is_a_clear_error(tmp_path):
    from moon_rl.errors import MoonError
    from moon_rl.training.grpo import run_grpo

    recipe = grpo_recipe(tmp_path, "grpo.per_device_train_batch_size=4", "grpo.num_generations=2")
    with pytest.raises(MoonError, match=r"distinct anchor\(s\).*per_device_train_batch_size"):
        run_grpo(recipe)


def test_reward_judge_is_logged_from_the_weighted_total_reward_per_group(setup):
    trainer = setup.trainer
    product = setup.catalogue.products[setup.examples[0].positive]
    truth = product.attributes["pattern"]
    other = next(v for v in trainer.attribute_vocabulary["pattern"] if v != truth)
    texts = [f"<think>pattern {truth}.</think>", f"<think>pattern {other}.</think>"] * 2  # two groups of two
    attributes = [product.attributes] * 4
    # Two reward functions: the first prefers the truth in both groups, the weighted total only in the second.
    rewards_per_func = torch.tensor([[1.0, 3.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    saved = trainer.reward_weights
    trainer.reward_weights = torch.tensor([1.0, -1.0])
    trainer._pending_metrics.pop("reward_judge/pattern", None)
    try:
        trainer._log_reward_judge(rewards_per_func, texts, attributes)
    finally:
        trainer.reward_weights = saved
    assert trainer._pending_metrics["reward_judge/pattern"] == [0.5]  # totals -2 vs 0 (lost), 1 vs 0 (won)
    assert "reward_judge/colour" not in trainer._pending_metrics  # no chain names a colour: no group had to choose


def test_infonce_drops_completions_the_loss_masks_as_truncated(setup):
    """With `mask_truncated_completions`, TRL zeroes a truncated completion's mask: its tokens are hidden from the loss
    forward, whose read-out would then not be the reward's (its last token), so it must leave the InfoNCE too."""
    trainer = setup.trainer
    calls = []
    original, setting = trainer._contrastive, trainer.args.contrastive_rows

    def spy(embeddings, pair_ids, *rest):
        calls.append(pair_ids.tolist())
        return original(embeddings, pair_ids, *rest)

    output = dict(trainer._generate_and_score_completions(generation_batch(setup, [8, 9, 10, 11])))
    masked = [1, 4, 6]  # what TRL does to truncated completions under mask_truncated_completions
    output["completion_mask"] = output["completion_mask"].clone()
    output["completion_mask"][masked] = 0
    trainer._contrastive, trainer.args.contrastive_rows = spy, "all"
    trainer.current_gradient_accumulation_steps = 1
    try:
        loss = trainer.compute_loss(trainer.model, dict(output))
        output["completion_mask"] = torch.zeros_like(output["completion_mask"])  # all masked: the policy loss alone
        alone = trainer.compute_loss(trainer.model, dict(output))
    finally:
        trainer._contrastive, trainer.args.contrastive_rows = original, setting
    assert torch.isfinite(loss) and torch.isfinite(alone)
    pairs = output["moon_pair"].tolist()
    assert calls == [[pairs[i] for i in range(8) if i not in masked]]  # and no call for the all-masked batch


def test_generation_ends_at_the_readout_token_only(tmp_path):
    """A model listing a second end token (Qwen2.5-VL: <|endoftext|>) must not stop chains there: they would be read
    out at a token SFT never trained as the read-out, unlike `embed` and `eval`, which stop at the end of turn."""
    from moon_rl.data.catalogue import load_recipe_catalogue
    from moon_rl.modeling.embedder import MoonEmbedder
    from moon_rl.rewards import RewardEntry
    from moon_rl.training.grpo import MoonGRPOTrainer
    from moon_rl.training.grpo_data import grpo_dataset
    from moon_rl.training.sampling import end_generation_at_readout
    from moon_rl.training.sft_data import sft_examples

    recipe = grpo_recipe(tmp_path)
    catalogue = load_recipe_catalogue(recipe.data)
    examples = sft_examples(catalogue, "train")[:8]
    embedder = MoonEmbedder.from_recipe(recipe).train()
    other_end = embedder.processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    embedder.model.generation_config.eos_token_id = [embedder.readout_id, other_end]
    trainer = MoonGRPOTrainer(embedder, [RewardEntry("recording", RecordingReward(), 1.0)], recipe.grpo_config(),
                              query_item=lambda pair: None, heads_learning_rate=1e-3,
                              train_dataset=grpo_dataset(embedder, catalogue, examples))
    assert trainer.generation_config.eos_token_id == [embedder.readout_id]
    assert trainer.eos_token_ids == [embedder.readout_id]
    vllm_args = SimpleNamespace(use_vllm=True, generation_kwargs={"top_k": 5})
    end_generation_at_readout(vllm_args, 7)
    assert vllm_args.generation_kwargs == {"top_k": 5, "stop_token_ids": [7], "ignore_eos": True}


def test_an_init_from_that_holds_no_model_is_an_error(tmp_path):
    """Named explicitly, a wrong folder must not quietly become 'start from the base model'."""
    # Last in this file: building a config resets accelerate's state, which the module's trainer still uses.
    from moon_rl.errors import MoonError
    from moon_rl.training.grpo import run_grpo

    (tmp_path / "sft-typo").mkdir()
    recipe = grpo_recipe(tmp_path, f"grpo.init_from={tmp_path / 'sft-typo'}")
    with pytest.raises(MoonError, match=r"grpo.init_from: .*sft-typo is not a moon-rl model folder"):
        run_grpo(recipe)
    assert not (tmp_path / "run" / "grpo" / "final").exists()


def test_importance_sampling_share_counts_what_trls_correction_dropped_or_clipped():
    from moon_rl.training.sampling import importance_sampling_share

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    token_masked = torch.tensor([[1.2, 0.0, 0.9, 0.0], [0.0, 1.0, 5.0, 0.0]])  # zeros at padding do not count
    assert importance_sampling_share(token_masked, mask, "token_mask", None, 3.0) == ("masked", 2 / 5)
    token_clipped = torch.tensor([[3.0, 0.5, 3.0, 3.0], [1.0, 3.0, 3.0, 9.0]])
    assert importance_sampling_share(token_clipped, mask, "token_truncate", None, 3.0) == ("clipped", 3 / 5)
    assert importance_sampling_share(token_clipped, mask, "token_truncate", 0.5, 3.0) == ("clipped", 4 / 5)
    sequence = torch.tensor([[0.0], [1.1], [0.0], [0.7]])
    assert importance_sampling_share(sequence, torch.ones(4, 2), "sequence_mask", None, 3.0) == ("masked", 0.5)


@pytest.mark.parametrize(("mode", "correction", "fire", "refused"), [
    ("sequence_mask", True, True, True), ("token_mask", True, True, True), ("token_truncate", False, True, True),
    ("token_truncate", True, True, False), ("sequence_mask", True, False, False)])
def test_vllm_with_fire_needs_a_token_level_truncated_correction(tmp_path, mode, correction, fire, refused):
    from moon_rl.errors import MoonError
    from moon_rl.training.grpo import run_grpo

    recipe = grpo_recipe(tmp_path, "grpo.use_vllm=true", f"grpo.vllm_importance_sampling_mode={mode}",
                         f"grpo.vllm_importance_sampling_correction={str(correction).lower()}",
                         f"model.heads.fire.enabled={str(fire).lower()}")
    problems = [p for p in recipe.check(device_checks=False, check_catalogue=False) if "FIRE" in p]
    assert bool(problems) == refused
    if refused:
        assert "token_truncate" in problems[0] and "grpo.use_vllm: false" in problems[0]
        with pytest.raises(MoonError, match="vLLM samples without FIRE"):
            run_grpo(recipe)


def test_right_answers_are_every_query_that_lists_the_product():
    """Pairs 0 and 1 share a query with positives [A, B] (one dataset row per positive); pair 2 is another query of A;
    pair 3 another product's. A's completions must not count pairs 1 (lists A) and 2 (A's) as wrong answers, in the
    reward's mask and the InfoNCE's, and B's completions must not count pair 0; neither answers pair 3's product."""
    from moon_rl.training.candidates import answer_mask
    from moon_rl.training.grpo_data import answers_by_product

    answers = answers_by_product(["A", "B", "A", "C"], [("A", "B"), ("A", "B"), ("A",), ("C",)])
    assert answers == {"A": (0, 1, 2), "B": (0, 1), "C": (3,)}
    trainer = SimpleNamespace(_answers=answers, pair_products=["A", "B", "A", "C"])
    from moon_rl.training.grpo import MoonGRPOTrainer

    trainer._pair_product = lambda pair: MoonGRPOTrainer._pair_product(trainer, pair)
    table = MoonGRPOTrainer._answer_table(trainer, [0, 1, 3], torch.device("cpu"))
    assert table.tolist() == [[0, 1, 2], [0, 1, 1], [3, 3, 3]]
    pool = torch.tensor([0, 1, 2, 3, 9])
    mask = answer_mask(pool, table, torch.tensor([0, 1, 3]))
    assert mask.tolist() == [[True, False, False, True, True],  # A: its own, then 1 and 2 are right answers
                             [False, True, True, True, True],  # B: pair 0 lists B; pair 2 (A's alone) competes
                             [True, True, True, True, True]]
