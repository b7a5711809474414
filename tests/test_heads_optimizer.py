"""The heads' own optimizer: the same updates as a shared parameter group, checkpoints, fp16 loss scaling."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import get_scheduler

from moon_rl.errors import MoonError
from moon_rl.training.heads_optimizer import HEADS_OPTIMIZER_FILE, HeadsOptimizer

STEPS = 6
ARGS = SimpleNamespace(lr_scheduler_type="cosine", lr_scheduler_kwargs={}, get_warmup_steps=lambda n: 1)


def make_heads(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def grads(step: int, heads: torch.nn.Module) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return [torch.randn(p.shape, generator=gen) for p in heads.parameters()]


def heads_optimizer(heads: torch.nn.Module, lr: float = 1e-2) -> HeadsOptimizer:
    opt = HeadsOptimizer(heads, lr)
    opt.build_optimizer(torch.optim.AdamW, {"lr": 5e-4, "betas": (0.9, 0.999), "eps": 1e-8})
    opt.build_scheduler(ARGS, STEPS)
    return opt


def step(opt: HeadsOptimizer, heads: torch.nn.Module, i: int) -> None:
    for p, g in zip(heads.parameters(), grads(i, heads), strict=True):
        p.grad = g.clone()
    opt.on_pre_optimizer_step(None, None, None)
    opt.on_optimizer_step(None, None, None)


def test_same_updates_as_a_heads_group_in_the_models_optimizer():
    shared_heads, own_heads = make_heads(), make_heads()
    body = torch.nn.Linear(2, 2)
    shared = torch.optim.AdamW([{"params": body.parameters()},
                                {"params": list(shared_heads.parameters()), "lr": 1e-2, "weight_decay": 0.0}],
                               lr=5e-4, betas=(0.9, 0.999), eps=1e-8)
    schedule = get_scheduler("cosine", optimizer=shared, num_warmup_steps=1, num_training_steps=STEPS)
    own = heads_optimizer(own_heads)
    assert own.optimizer.param_groups[0]["weight_decay"] == 0.0
    for i in range(STEPS):
        for p, g in zip(shared_heads.parameters(), grads(i, shared_heads), strict=True):
            p.grad = g.clone()
        shared.step()
        schedule.step()
        step(own, own_heads, i)
        assert all(p.grad is None for p in own_heads.parameters())  # zeroed after each step
    for a, b in zip(shared_heads.parameters(), own_heads.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_round_trip_restores_moments_and_schedule(tmp_path):
    heads = make_heads()
    opt = heads_optimizer(heads)
    for i in range(3):
        step(opt, heads, i)
    opt.save(tmp_path)
    assert (tmp_path / HEADS_OPTIMIZER_FILE).is_file() and not list(tmp_path.glob(".*tmp"))
    resumed_heads = make_heads()
    resumed_heads.load_state_dict(heads.state_dict())
    resumed = heads_optimizer(resumed_heads)
    resumed.load(tmp_path)
    assert resumed.scheduler.last_epoch == 3
    for i in range(3, STEPS):  # the rest of the run continues identically
        step(opt, heads, i)
        step(resumed, resumed_heads, i)
    for a, b in zip(heads.parameters(), resumed_heads.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_without_the_heads_optimizer_is_a_clear_error(tmp_path):
    opt = heads_optimizer(make_heads())
    with pytest.raises(MoonError, match=f"{tmp_path}: checkpoint has no {HEADS_OPTIMIZER_FILE}"):
        opt.load(tmp_path)


class FakeScaler:
    def __init__(self, scale: float):
        self.scale = scale

    def get_scale(self) -> float:
        return self.scale

    def is_enabled(self) -> bool:
        return True


def test_fp16_loss_scale_is_undone_and_skipped_steps_are_skipped():
    plain_heads, scaled_heads = make_heads(), make_heads()
    plain, scaled = heads_optimizer(plain_heads), heads_optimizer(scaled_heads)
    scaled.accelerator = SimpleNamespace(scaler=FakeScaler(1024.0), optimizer_step_was_skipped=False)
    for p, q, g in zip(plain_heads.parameters(), scaled_heads.parameters(), grads(0, plain_heads), strict=True):
        p.grad, q.grad = g.clone(), g * 1024.0
    for opt in (plain, scaled):
        opt.on_pre_optimizer_step(None, None, None)
        opt.on_optimizer_step(None, None, None)
    for a, b in zip(plain_heads.parameters(), scaled_heads.parameters(), strict=True):
        torch.testing.assert_close(a, b)

    before = [p.detach().clone() for p in scaled_heads.parameters()]
    for case in ("trainer skipped", "inf in the heads"):
        scaled.accelerator.optimizer_step_was_skipped = case == "trainer skipped"
        for p, g in zip(scaled_heads.parameters(), grads(1, scaled_heads), strict=True):
            p.grad = g * (float("inf") if case == "inf in the heads" else 1.0)
        scaled.on_pre_optimizer_step(None, None, None)
        scaled.on_optimizer_step(None, None, None)
        assert all(torch.equal(p, b) for p, b in zip(scaled_heads.parameters(), before, strict=True)), case
        assert all(p.grad is None for p in scaled_heads.parameters())
    assert scaled.scheduler.last_epoch == 1  # the skipped steps did not advance the schedule


def test_heads_gradients_are_clipped_to_the_trainers_max_grad_norm():
    heads = make_heads()
    opt = HeadsOptimizer(heads, 1.0)
    opt.build_optimizer(torch.optim.SGD, {})
    before = [p.detach().clone() for p in heads.parameters()]
    for p in heads.parameters():
        p.grad = torch.full_like(p, 3.0)
    norm = 3.0 * sum(p.numel() for p in heads.parameters()) ** 0.5
    opt.on_pre_optimizer_step(SimpleNamespace(max_grad_norm=0.5), None, None)
    opt.on_optimizer_step(SimpleNamespace(max_grad_norm=0.5), None, None)
    moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, heads.parameters(), strict=True)])
    assert opt.grad_norm == pytest.approx(norm)  # logged before clipping, as the Trainer's grad_norm
    assert float(moved.norm()) == pytest.approx(0.5, rel=1e-5)  # SGD at lr 1: the update is the clipped gradient
    # The stage's heads_max_grad_norm wins over max_grad_norm; 0 turns clipping off (the norm is still measured).
    for heads_max, expected in ((0.25, 0.25), (0, norm)):
        before = [p.detach().clone() for p in heads.parameters()]
        for p in heads.parameters():
            p.grad = torch.full_like(p, 3.0)
        args = SimpleNamespace(max_grad_norm=0.5, heads_max_grad_norm=heads_max)
        opt.on_pre_optimizer_step(args, None, None)
        opt.on_optimizer_step(args, None, None)
        moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, heads.parameters(), strict=True)])
        assert float(moved.norm()) == pytest.approx(expected, rel=1e-5) and opt.grad_norm == pytest.approx(norm)


def _broadcast_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    heads = make_heads(seed=rank)  # each process initialised its own heads differently
    HeadsOptimizer(heads, 1e-3).on_train_begin(None, None, None)
    torch.save({k: v.clone() for k, v in heads.state_dict().items()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_heads_start_from_process_0s_weights(tmp_path):
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    mp.spawn(_broadcast_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    zero, one = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    reference = make_heads(seed=0).state_dict()
    for key in reference:
        torch.testing.assert_close(zero[key], reference[key])
        torch.testing.assert_close(one[key], reference[key])
