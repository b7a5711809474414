"""The heads' own optimizer and learning-rate schedule, stepped together with the Trainer's.

The heads (fusion, FIRE, projection) live outside the HF model that accelerate wraps (DDP, FSDP, DeepSpeed), so they
cannot sit in the Trainer's optimizer: FSDP's and DeepSpeed's optimizer checkpoints only know the wrapped model's
parameters (`FSDP.optim_state_dict` fails on any other), and ZeRO-3 partitions every parameter its optimizer holds.
A second optimizer of the same class and settings (AdamW by default), with the same schedule type and length, gives the
heads the update one shared optimizer with a heads parameter group would (clipping aside: below), and checkpoints as
its own file.

At the start of training the callback broadcasts the heads from process 0, as DDP does for the wrapped model (a
process that initialised or loaded them differently would otherwise train its own copy). Per optimizer step it:
* all-reduces (averages) the heads' gradients across processes, which DDP/FSDP do for the wrapped model only;
* with fp16 loss scaling, unscales them, and skips the step wherever the Trainer's step was skipped (inf/NaN);
* clips them to the stage's `heads_max_grad_norm`, by default the Trainer's `max_grad_norm` (their own norm: the
  Trainer clips the model's before the callbacks run, so one joint norm is not available); the norm before clipping is
  logged as `heads_grad_norm`;
* steps the heads' optimizer and schedule, then zeroes the heads' gradients (the Trainer zeroes the model's only).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, get_scheduler

from moon_rl.cache import atomic_write_bytes
from moon_rl.errors import MoonError

logger = logging.getLogger(__name__)

HEADS_OPTIMIZER_FILE = "moon_heads_optimizer.pt"


class HeadsOptimizer(TrainerCallback):
    """Optimizer + schedule for `heads`, built by the trainer's `create_optimizer` / `create_scheduler` and stepped by
    the Trainer's optimizer-step callbacks.

    Args:
        heads (`torch.nn.Module`): the trainable heads.
        learning_rate (`float`): their peak learning rate (the schedule scales it like the Trainer's).
    """

    def __init__(self, heads: torch.nn.Module, learning_rate: float):
        self.heads = heads
        self.learning_rate = learning_rate
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.accelerator: Any = None  # set by the trainer: fp16 loss scale and skipped steps
        self._scale: float | None = None
        self.grad_norm: float | None = None  # the last step's, before clipping

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.heads.parameters() if p.requires_grad]

    def build_optimizer(self, optimizer_cls: type, optimizer_kwargs: dict[str, Any]) -> None:
        """An optimizer of the Trainer's class and settings over the heads (no weight decay, their own rate).

        Optimizers that need the model itself (factories, GaLore, LOMO, layer-wise) fall back to AdamW with the
        Trainer's betas and epsilon.
        """
        if self.optimizer is not None or not self.params:
            return
        if isinstance(optimizer_cls, type) and not {"params", "model", "optimizer_dict"} & optimizer_kwargs.keys():
            cls, kwargs = optimizer_cls, dict(optimizer_kwargs)
        else:
            cls, kwargs = torch.optim.AdamW, {k: v for k, v in optimizer_kwargs.items() if k in ("betas", "eps")}
        kwargs["lr"] = self.learning_rate
        self.optimizer = cls([{"params": self.params, "weight_decay": 0.0}], **kwargs)

    def build_scheduler(self, args: Any, num_training_steps: int) -> None:
        """The Trainer's schedule type, warm-up and length over the heads' optimizer."""
        if self.optimizer is None or self.scheduler is not None:
            return
        self.scheduler = get_scheduler(
            args.lr_scheduler_type, optimizer=self.optimizer, num_warmup_steps=args.get_warmup_steps(num_training_steps),
            num_training_steps=num_training_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs,
        )

    # ------------------------------------------------------------------ Trainer callbacks
    def on_train_begin(self, args, state, control, **kwargs):
        if _world_size() > 1:
            with torch.no_grad():
                for tensor in [*self.heads.parameters(), *self.heads.buffers()]:
                    dist.broadcast(tensor.data, src=0)
        self.heads.zero_grad(set_to_none=True)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if _world_size() > 1:
            for param in self.params:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad)
                param.grad /= dist.get_world_size()
        scaler = getattr(self.accelerator, "scaler", None)
        # Read before the Trainer's step: `scaler.update()` inside it changes the scale.
        self._scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.optimizer is not None and self._step_is_valid():
            max_norm = getattr(args, "heads_max_grad_norm", None)
            max_norm = getattr(args, "max_grad_norm", None) if max_norm is None else max_norm
            # An infinite bound only measures the norm (for the log).
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm or float("inf")))
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        self.heads.zero_grad(set_to_none=True)

    def _step_is_valid(self) -> bool:
        """False when fp16 loss scaling skipped this step (the Trainer's, or inf/NaN in the heads' gradients)."""
        if self._scale is None:
            return True
        if getattr(self.accelerator, "optimizer_step_was_skipped", False):
            return False
        grads = [p.grad for p in self.params if p.grad is not None]
        for grad in grads:
            grad.div_(self._scale)
        return all(bool(torch.isfinite(g).all()) for g in grads)

    # ------------------------------------------------------------------ checkpoints
    def save(self, folder: str | Path) -> None:
        """Optimizer and schedule state into `folder` (written atomically)."""
        if self.optimizer is None:
            return
        state = {"optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(Path(folder) / HEADS_OPTIMIZER_FILE, buffer.getvalue())

    def load(self, folder: str | Path) -> None:
        """Restore what `save` wrote (tensors and plain values only: `weights_only=True`)."""
        if self.optimizer is None:
            return
        path = Path(folder) / HEADS_OPTIMIZER_FILE
        if not path.is_file():
            raise MoonError(f"{folder}: checkpoint has no {HEADS_OPTIMIZER_FILE} (an older moon-rl kept the heads in "
                            "the model's optimizer); resume from a checkpoint of this version, or start again with "
                            "--overwrite")
        device = self.params[0].device
        state = torch.load(path, map_location=device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
