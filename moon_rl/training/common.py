"""What `MoonSFTTrainer` and `MoonGRPOTrainer` add to their TRL parents alike: the heads.

The heads (fusion, FIRE, projection) live outside the HF model, so that TRL's weight sync to vLLM never sees them and
`save_pretrained` stays a plain HF checkpoint. The mixin gives them their own optimizer group, keeps their gradients
right (zeroed after each step, averaged across processes) and puts them into every checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from moon_rl.cache import atomic_write_text
from moon_rl.modeling.embedder import MoonEmbedder
from moon_rl.training.checkpoint import FINAL_DIR, latest_checkpoint, load_heads, mark_complete, save_heads

logger = logging.getLogger(__name__)


def global_count(n: int, device: torch.device) -> int:
    """Rows of a subset over all processes (every process must call a collective, or none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return n
    count = torch.tensor([n], device=device)
    dist.all_reduce(count)
    return int(count.item())


class HeadsGradients(TrainerCallback):
    """Gradient bookkeeping for the heads, which live outside the (DDP-wrapped) HF model.

    `Trainer` zeroes only `model`'s gradients after each optimizer step, and DDP averages only `model`'s gradients;
    without this callback the heads' gradients would accumulate across steps and differ across processes.
    """

    def __init__(self, heads: torch.nn.Module):
        self.heads = heads

    def on_train_begin(self, args, state, control, **kwargs):
        self.heads.zero_grad(set_to_none=True)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for param in self.heads.parameters():
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad)
                param.grad /= dist.get_world_size()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.heads.zero_grad(set_to_none=True)


class MoonTrainerMixin:
    """Mixin for a TRL trainer whose `model` is `embedder.model`: heads optimizer group, checkpoints, resume.

    Use it first in the bases (`class MoonSFTTrainer(MoonTrainerMixin, SFTTrainer)`) and call `_init_moon` before
    the TRL `__init__`.
    """

    embedder: MoonEmbedder
    heads_learning_rate: float

    def _init_moon(self, embedder: MoonEmbedder, heads_learning_rate: float, trainer_kwargs: dict[str, Any]) -> None:
        self.embedder = embedder
        self.heads_learning_rate = heads_learning_rate
        trainer_kwargs["callbacks"] = [*(trainer_kwargs.get("callbacks") or []), HeadsGradients(embedder.heads)]

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        heads = [p for p in self.embedder.heads.parameters() if p.requires_grad]
        if heads and not any(any(p is q for q in heads) for g in optimizer.param_groups for p in g["params"]):
            optimizer.add_param_group({"params": heads, "lr": self.heads_learning_rate, "weight_decay": 0.0})
        return optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Full-weight checkpoints reload through `from_pretrained`.

        transformers saves Qwen-VL weights under their original checkpoint names (`visual.*`, `model.layers.*`) and
        `from_pretrained` maps them back, but `Trainer._load_from_checkpoint` loads the raw state dict: every key
        misses and the run would silently resume from the initial weights. PEFT adapters load fine the usual way.
        """
        if hasattr(self.model, "peft_config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        reloaded = type(self.model).from_pretrained(resume_from_checkpoint, dtype=self.model.dtype)
        missing, unexpected = self.model.load_state_dict(reloaded.state_dict(), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {resume_from_checkpoint} does not match the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        return None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        save_heads(self.embedder.heads, output_dir or self.args.output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            mark_complete(folder, self.state.global_step)


def train_and_save(trainer: Any, embedder: MoonEmbedder, out: Path, *, resume: bool) -> float | None:
    """Train (from the newest complete checkpoint with `resume`), then, on the saving process, write the final model
    (`out/final`) and `out/log_history.json`. Returns the training seconds there, None on the other processes."""
    checkpoint = latest_checkpoint(out) if resume else None
    if checkpoint is not None:
        load_heads(embedder.heads, checkpoint)
        logger.warning("resuming from %s", checkpoint)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - started
    if not trainer.args.should_save:
        return None
    embedder.save(out / FINAL_DIR)
    atomic_write_text(out / "log_history.json", json.dumps(trainer.state.log_history, indent=1))
    return seconds
