"""What `MoonSFTTrainer` and `MoonGRPOTrainer` add to their TRL parents alike: the heads.

The heads (fusion, FIRE, projection) live outside the HF model, so that TRL's weight sync to vLLM never sees them and
`save_pretrained` stays a plain HF checkpoint. The mixin gives them their own optimizer and schedule
(training/heads_optimizer.py), puts them and that optimizer's state into every checkpoint, and handles the final save
and resume under sharded training (FSDP, DeepSpeed), where the model's parameters are spread over the processes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moon_rl.cache import atomic_write_text
from moon_rl.errors import MoonError
from moon_rl.modeling.embedder import MoonEmbedder
from moon_rl.modeling.folder import FINAL_DIR
from moon_rl.modeling.matryoshka import loss_dims
from moon_rl.training.checkpoint import latest_checkpoint, load_heads, mark_complete, save_heads
from moon_rl.training.heads_optimizer import HeadsOptimizer

logger = logging.getLogger(__name__)


def global_count(n: int, device: torch.device) -> int:
    """Rows of a subset over all processes (every process must call a collective, or none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return n
    count = torch.tensor([n], device=device)
    dist.all_reduce(count)
    return int(count.item())


def upcast_trainable_parameters(model: torch.nn.Module) -> int:
    """Trainable bf16/fp16 parameters to float32, in place; returns how many. Quantized weights are frozen: untouched.

    Under FSDP mixed precision accelerate upcasts the trainable parameters to float32 itself, but only inside
    FSDP's flat parameters, which the original parameters see from FSDP's first forward on. A resume loads the model
    and optimizer state before that forward, into the bf16 parameters: the saved float32 weights and Adam moments
    were rounded to bf16 (measured: resumed weights off by 2e-3), and the fused AdamW step then failed on bf16
    moments beside float32 parameters. Float32 from the start is what accelerate would make of them anyway.
    """
    count = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
            count += 1
    return count


class MoonTrainerMixin:
    """Mixin for a TRL trainer whose `model` is `embedder.model`: heads optimizer, checkpoints, resume.

    Use it first in the bases (`class MoonSFTTrainer(MoonTrainerMixin, SFTTrainer)`) and call `_init_moon` before
    the TRL `__init__`.
    """

    embedder: MoonEmbedder
    heads_optimizer: HeadsOptimizer

    def _init_moon(self, embedder: MoonEmbedder, heads_learning_rate: float, trainer_kwargs: dict[str, Any]) -> None:
        self.embedder = embedder
        # The contrastive terms' embedding sizes: the full one, and the Matryoshka prefixes the heads were built for.
        self.contrastive_dims = loss_dims(embedder.heads.config.embed_dim, embedder.heads.config.matryoshka_dims)
        self.heads_optimizer = HeadsOptimizer(embedder.heads, heads_learning_rate)
        trainer_kwargs["callbacks"] = [*(trainer_kwargs.get("callbacks") or []), self.heads_optimizer]

    def _finish_moon_init(self) -> None:
        """After the TRL `__init__`: refuse what FSDP cannot checkpoint, upcast for FSDP mixed precision, heads on the
        training device, the accelerator known to the heads' optimizer."""
        if self.is_fsdp_enabled and self.accelerator.num_processes == 1 and any(
                not p.requires_grad for p in self.model.parameters()):
            # torch's FSDP falls back to NO_SHARD on one process; after a backward, NO_SHARD leaves frozen parameters
            # as plain tensors, which drop out of `state_dict()`, and the first checkpoint fails (torch 2.11 and 2.13).
            raise MoonError("FSDP on a single process cannot checkpoint a model with frozen parameters (LoRA): run "
                            "on one GPU without `accelerate launch`, or launch FSDP with --num_processes >= 2")
        fsdp_mixed_precision = self.is_fsdp_enabled and self.accelerator.mixed_precision in ("bf16", "fp16")
        if fsdp_mixed_precision and (count := upcast_trainable_parameters(self.model)):
            logger.info("FSDP mixed precision: %d trainable parameters upcast to float32", count)
        self.embedder.heads.to(self.accelerator.device)
        self.heads_optimizer.accelerator = self.accelerator

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        cls, kwargs = (self.optimizer_cls_and_kwargs if self.optimizer_cls_and_kwargs is not None
                       else self.get_optimizer_cls_and_kwargs(self.args, self.model))
        self.heads_optimizer.build_optimizer(cls, kwargs)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        self.heads_optimizer.build_scheduler(self.args, num_training_steps)
        return scheduler

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            self.heads_optimizer.save(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            # First: a checkpoint of an older moon-rl (heads in the model's optimizer) then fails with moon-rl's clear
            # error instead of torch's "different number of parameter groups".
            self.heads_optimizer.load(checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Beside the Trainer's `grad_norm` (the model's): the heads' own, clipped separately (heads_optimizer.py).
        if "loss" in logs and self.heads_optimizer.grad_norm is not None:
            logs["heads_grad_norm"] = self.heads_optimizer.grad_norm
        super().log(logs, start_time)

    @property
    def is_sharded(self) -> bool:
        """FSDP or DeepSpeed: the model's parameters may be spread over the processes (calls must go through the
        wrapper, states must be gathered)."""
        return bool(self.is_fsdp_enabled or self.is_deepspeed_enabled)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Full-weight checkpoints reload through `from_pretrained`.

        transformers saves Qwen-VL weights under their original checkpoint names (`visual.*`, `model.layers.*`) and
        `from_pretrained` maps them back, but `Trainer._load_from_checkpoint` loads the raw state dict: every key
        misses and the run would silently resume from the initial weights. PEFT adapters load fine the usual way.
        """
        # FSDP and DeepSpeed reload from their own state files, whose keys match the model's.
        if hasattr(self.model, "peft_config") or self.is_sharded:
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


def train_and_save(trainer: Any, embedder: MoonEmbedder, out: Path, *, resume: bool) -> None:
    """Train (from the newest complete checkpoint with `resume`), then, on the saving process, write the final model
    (`out/final`) and `out/log_history.json` (whose last entry holds the Trainer's `train_runtime`)."""
    checkpoint = latest_checkpoint(out) if resume else None
    if checkpoint is not None:
        load_heads(embedder.heads, checkpoint)
        logger.info("resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    # Sharded weights are gathered into one state dict on the saving process; every process must take part.
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_sharded else None
    if not trainer.args.should_save:
        return
    embedder.save(out / FINAL_DIR, state_dict=state_dict)
    atomic_write_text(out / "log_history.json", json.dumps(trainer.state.log_history, indent=1))
