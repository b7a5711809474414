"""Generation backends for `reason` mode: transformers `generate` (default) and vLLM (GPU, optional).

vLLM is a GPU-only optional extra: it is imported only when a recipe asks for `generation_backend: vllm`, never on
the CPU paths.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from moon_rl.errors import MoonError
from moon_rl.modeling.inputs import PromptBatch


@torch.inference_mode()
def hf_generate(
    model: Any, prompts: PromptBatch, *, pad_id: int, eos_id: int, image_token_id: int, max_new_tokens: int,
    do_sample: bool = False, temperature: float = 1.0, num_return_sequences: int = 1,
) -> list[list[int]]:
    """Completion ids (without padding and without the final end-of-turn token) for each prompt, left-padded batch."""
    width = max(len(p) for p in prompts.prompt_ids)
    ids = torch.full((len(prompts.prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts.prompt_ids):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                              "mm_token_type_ids": (ids == image_token_id).long().to(device)}
    if prompts.pixel_values is not None:
        kwargs["pixel_values"] = prompts.pixel_values.to(device)
        kwargs["image_grid_thw"] = prompts.image_grid_thw.to(device)
    sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
    out = model.generate(
        **kwargs, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
        # A sampled image placeholder would break the image-feature count of the read-out forward (TRL does the same).
        suppress_tokens=[image_token_id], num_return_sequences=num_return_sequences,
        top_k=None, top_p=None, **sampling,
    )
    completions = []
    for row in out[:, width:].tolist():
        if eos_id in row:
            row = row[: row.index(eos_id)]
        while row and row[-1] == pad_id:
            row.pop()
        completions.append(row)
    return completions


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VLLMGenerator:
    """Greedy/sampled reasoning with vLLM from a folder holding a full (merged) model. GPU only.

    FIRE is not applied inside vLLM (its parameters are not part of the HF model); the read-out forward that follows
    runs in transformers with FIRE, so the embedding itself is unaffected.
    """

    def __init__(self, model_path: str, *, gpu_memory_utilization: float = 0.3, max_model_len: int | None = None):
        if not vllm_available():
            raise MoonError("embed.generation_backend is 'vllm' but vllm is not installed; "
                            "on a GPU machine: pip install 'moon-rl[vllm]'")
        from vllm import LLM  # noqa: PLC0415 - optional GPU dependency, imported only here

        self.llm = LLM(model=model_path, gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len)

    def generate(self, prompt_ids: list[list[int]], images: list[list[Any]], *, max_new_tokens: int,
                 temperature: float = 0.0) -> list[list[int]]:
        from vllm import SamplingParams  # noqa: PLC0415

        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature)
        requests = [
            {"prompt_token_ids": ids, **({"multi_modal_data": {"image": imgs}} if imgs else {})}
            for ids, imgs in zip(prompt_ids, images, strict=True)
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]
