"""How GRPO samples: completions stop at the read-out token only, and what TRL's vLLM importance-sampling
correction did to a generation batch (training/grpo.py logs it)."""

from __future__ import annotations

import torch

from moon_rl.training.configs import MoonGRPOConfig

__all__ = ["end_generation_at_readout", "importance_sampling_share"]


def importance_sampling_share(ratio: torch.Tensor, completion_mask: torch.Tensor, mode: str,
                              clip_min: float | None, clip_max: float | None) -> tuple[str, float]:
    """What TRL's vLLM importance-sampling correction did to a generation batch: ("masked" | "clipped", share).

    `*_mask` modes set out-of-bounds ratios to 0 (that sequence or token is dropped from the loss); `*_truncate` modes
    clamp them to the bounds. The share is over sequences (`sequence_*`, ratio of shape (B, 1)) or over completion
    tokens (`token_*`, (B, T)). A ratio is exp(log-prob difference), never exactly 0 or a bound by chance.
    """
    ratio = ratio.detach().float()
    if mode.startswith("token"):
        valid = completion_mask.bool()
    else:
        ratio, valid = ratio.reshape(-1, 1), torch.ones(ratio.shape[0], 1, dtype=torch.bool, device=ratio.device)
    if mode.endswith("mask"):
        name, hit = "masked", ratio == 0
    else:
        hit = torch.zeros_like(ratio, dtype=torch.bool)
        for bound in (clip_min, clip_max):
            if bound is not None:
                hit |= ratio == bound
        name = "clipped"
    count = int(valid.sum())
    return name, float((hit & valid).sum()) / count if count else 0.0


def end_generation_at_readout(args: MoonGRPOConfig, readout_id: int) -> None:
    """Completions end at the read-out token (the end of turn) only, as `embed` and `eval` generate them.

    The read-out rule: a completion is read at its end-of-turn token, and one without it (truncated) at its last token.
    Models list other end tokens too (Qwen2.5-VL: `<|endoftext|>`); a chain stopped there would be read at a token SFT
    never trained as the read-out, and differently in training than in evaluation. Set before TRL builds its
    generation config (transformers) or sampling parameters (vLLM: stop on the read-out token, ignore the model's EOS).
    """
    kwargs = dict(args.generation_kwargs or {})
    if args.use_vllm:
        kwargs.update(stop_token_ids=[readout_id], ignore_eos=True)
    else:
        kwargs.update(eos_token_id=[readout_id])
    args.generation_kwargs = kwargs
