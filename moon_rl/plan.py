"""`moon-rl plan`: GPU memory per device of each training stage of a recipe, estimated without loading weights.

Shapes come from `KNOWN_ARCHITECTURES` or a local folder's `config.json` (no download). GiB = 2**30 bytes; real peaks
add the CUDA context (~0.5-1 GiB) and allocator slack. Per device, for a micro batch of `rows` x `seq` tokens:

- weights: all base parameters in `model.dtype`; quantised: linear weights at bits/8 bytes, the rest (embeddings,
  `lm_head`, norms) fp32, as peft's `prepare_model_for_kbit_training` casts them for QLoRA.
- trainable: LoRA, r x (in + out) per linear layer that `model.lora.target_modules` fully matches (as peft does), fp32
  (peft's adapter autocast; bf16 under QLoRA, which TRL casts), or all base weights when `lora` is null; + `MoonHeads`
  (fp32). optimizer: AdamW, 2 states per trainable parameter in its dtype (1 byte each for an `8bit` optim); DeepSpeed
  keeps fp32 states + an fp32 master copy: 12 bytes. gradients: 1 per trainable parameter.
- activations, bytes per token per decoder layer (a = activation bytes, h = hidden, kv = kv heads x head dim, i = MLP
  size) without gradient checkpointing: 8h + a(2h + 2kv + 3i) for frozen weights (fp32 RMSNorm inputs, q/k/v and output
  of sdpa, which keeps no attention matrix (eager adds a x heads x seq), the MLP's gate, act and up), + a(5h + i) when
  the weights train, + (adapter bytes, + 1 with dropout) x the inputs of the adapted linears (peft casts each input to
  the adapter dtype). Checkpointing keeps each layer's input (a x h) + 1.5 layers (the recomputed one, backward
  buffers). Within 6% of random-init Qwen2.5-VL-3B/7B measured (bf16, sdpa, LoRA r=16, H200). The vision tower counts
  if it trains. No logits (TRL's fused LM head).
- generation KV cache (GRPO, transformers generation): rows x steps_per_generation sequences x layers x 2 x kv x a; it
  lives while generating, not in backward: the total takes the larger of it and the activations.
- vLLM share (colocate): `vllm_gpu_memory_utilization` x device memory; server mode runs on other GPUs.
- sharding across `gpus`: zero2 splits optimizer and gradients, zero3 / fsdp also weights and trainable parameters.

seq = prompt text + `data.max_images_per_product` x `model.image_max_pixels` / (patch x merge)^2 image tokens +
`grpo.max_completion_length` (at most `sft.max_length` in SFT). Rows: `per_device_train_batch_size`, x (3 +
`hard_negatives` + `chain_negatives` + `photo_traces`) in SFT (trace, anchor, direct product, negatives, altered chain
and photo-only trace of each pair, padded to the longest).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moon_rl.errors import MoonError
from moon_rl.recipe import Recipe

__all__ = ["KNOWN_ARCHITECTURES", "STRATEGIES", "Architecture", "StagePlan", "architecture", "format_plan",
           "plan_recipe"]

GIB = 2**30
STRATEGIES = ("ddp", "zero2", "zero3", "fsdp")
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Architecture:
    """What the estimate needs of a Qwen-VL model: text decoder and vision tower shapes (as in its config.json)."""

    model_type: str  # qwen2_5_vl, qwen3_vl or qwen2_vl
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # lm_head shares the embedding matrix
    vision_hidden: int
    vision_intermediate: int
    vision_depth: int
    patch: int
    merge: int = 2
    deepstack: int = 0  # Qwen3-VL deepstack mergers
    position_embeddings: int = 0  # Qwen3-VL learned vision position embeddings
    dtype: str = "bfloat16"  # checkpoint dtype, what `model.dtype: auto` loads

    def linears(self) -> list[tuple[str, int, int, bool]]:
        """(module name, in, out, has bias) of every linear layer but `lm_head`, named as transformers 5 does."""
        h, kv, q, i_ = self.hidden, self.kv_heads * self.head_dim, self.heads * self.head_dim, self.intermediate
        bias = self.model_type != "qwen3_vl"  # Qwen2(.5) put biases on q/k/v; Qwen3 has q/k norms instead
        out: list[tuple[str, int, int, bool]] = []
        for i in range(self.layers):
            p = f"model.language_model.layers.{i}."
            out += [(p + "self_attn.q_proj", h, q, bias), (p + "self_attn.k_proj", h, kv, bias),
                    (p + "self_attn.v_proj", h, kv, bias), (p + "self_attn.o_proj", q, h, False),
                    (p + "mlp.gate_proj", h, i_, False), (p + "mlp.up_proj", h, i_, False),
                    (p + "mlp.down_proj", i_, h, False)]
        vh, vi, wide = self.vision_hidden, self.vision_intermediate, self.vision_hidden * self.merge**2
        mlp = {"qwen2_5_vl": [("gate_proj", vh, vi), ("up_proj", vh, vi), ("down_proj", vi, vh)],
               "qwen3_vl": [("linear_fc1", vh, vi), ("linear_fc2", vi, vh)],
               "qwen2_vl": [("fc1", vh, vi), ("fc2", vi, vh)]}[self.model_type]
        for i in range(self.vision_depth):
            p = f"model.visual.blocks.{i}."
            out += [(p + "attn.qkv", vh, 3 * vh, True), (p + "attn.proj", vh, vh, True)]
            out += [(p + "mlp." + name, a, b, True) for name, a, b in mlp]
        mergers = ["model.visual.merger.", *(f"model.visual.deepstack_merger_list.{k}." for k in range(self.deepstack))]
        names = ("linear_fc1", "linear_fc2") if self.model_type == "qwen3_vl" else ("mlp.0", "mlp.2")
        for p in mergers:
            out += [(p + names[0], wide, wide, True), (p + names[1], wide, h, True)]
        return out

    def params(self) -> tuple[int, int, int]:
        """(all parameters, vision tower parameters, linear weights): equal to transformers' counts for every entry."""
        h, vh, wide = self.hidden, self.vision_hidden, self.vision_hidden * self.merge**2
        qwen3, linears = self.model_type == "qwen3_vl", self.linears()
        # Outside the linear layers: embeddings, lm_head, norms (qwen3: + q/k norms), patch and position embeddings.
        text = self.vocab * h * (1 if self.tied else 2) + self.layers * (2 * h + 2 * self.head_dim * qwen3) + h
        norm = 1 if self.model_type == "qwen2_5_vl" else 2  # RMSNorm weight, or LayerNorm weight + bias
        vision_other = 6 * self.patch**2 * vh + (vh if qwen3 else 0) + self.position_embeddings * vh
        vision_other += (2 * self.vision_depth + 1) * norm * vh + self.deepstack * 2 * wide
        weights, biases = sum(a * b for _, a, b, _ in linears), sum(b for _, _, b, bias in linears if bias)
        vision = vision_other + sum(a * b + b * bias for name, a, b, bias in linears if ".visual." in name)
        return weights + biases + text + vision_other, vision, weights


#: Shapes of the models recipes name, from their config.json files, so `plan` needs no download.
KNOWN_ARCHITECTURES: dict[str, Architecture] = {  # type, hidden, MLP, layers, heads, kv heads, head dim, vocab,
    # tied, vision hidden, MLP, depth, patch. Builtins: moon_rl/modeling/tiny.py (799-token BPE vocabulary, float32).
    "Qwen/Qwen2.5-VL-3B-Instruct": Architecture("qwen2_5_vl", 2048, 11008, 36, 16, 2, 128, 151936, True, 1280, 3420, 32,
                                                14),
    "Qwen/Qwen2.5-VL-7B-Instruct": Architecture("qwen2_5_vl", 3584, 18944, 28, 28, 4, 128, 152064, False, 1280, 3420,
                                                32, 14),
    "Qwen/Qwen3-VL-2B-Instruct": Architecture("qwen3_vl", 2048, 6144, 28, 16, 8, 128, 151936, True, 1024, 4096, 24, 16,
                                              deepstack=3, position_embeddings=2304),
    "builtin:tiny-vl/tiny": Architecture("qwen2_5_vl", 128, 256, 2, 4, 2, 32, 799, False, 64, 128, 2, 14,
                                         dtype="float32"),
    "builtin:tiny-vl/small": Architecture("qwen2_5_vl", 512, 1024, 4, 16, 2, 32, 799, False, 256, 512, 4, 14,
                                          dtype="float32"),
}


def _from_config(folder: Path) -> Architecture:
    """The architecture in a local model folder's config.json (transformers 4 or 5 layout)."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MoonError(f"model.name_or_path: cannot read {path}: {exc}") from exc
    kind = config.get("model_type")
    if kind not in ("qwen2_5_vl", "qwen3_vl", "qwen2_vl"):
        raise MoonError(f"{path}: `moon-rl plan` sizes qwen2_5_vl, qwen3_vl and qwen2_vl models, not {kind!r}")
    text, vision = {**config, **(config.get("text_config") or {})}, config.get("vision_config") or {}
    vision_keys = ("embed_dim", "mlp_ratio") if kind == "qwen2_vl" else ("hidden_size", "intermediate_size")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "num_key_value_heads", "vocab_size") if k not in text]
    missing += [f"vision_config.{k}" for k in ("depth", "patch_size", *vision_keys) if k not in vision]
    if missing:
        raise MoonError(f"{path}: cannot size the model, missing {', '.join(missing)}")
    vh = vision[vision_keys[0]]
    return Architecture(
        kind, text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"], text["num_attention_heads"],
        text["num_key_value_heads"], text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
        text["vocab_size"], bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))), vh,
        int(vh * vision["mlp_ratio"]) if kind == "qwen2_vl" else vision["intermediate_size"], vision["depth"],
        vision["patch_size"], vision.get("spatial_merge_size", 2), len(vision.get("deepstack_visual_indexes") or []),
        vision.get("num_position_embeddings") or 0,
        next((d for d in (text.get("dtype"), text.get("torch_dtype"), config.get("dtype")) if d in _BYTES),
             "bfloat16"),
    )


def architecture(model: Any) -> Architecture:
    """A recipe `model`'s shape: a local folder's config.json, else `KNOWN_ARCHITECTURES`; MoonError if neither."""
    name = str(model.name_or_path)
    if name.startswith("builtin:"):
        name = f"{name}/{model.builtin_size}"
    elif Path(name).expanduser().is_dir():
        return _from_config(Path(name).expanduser())
    known = {key.lower(): arch for key, arch in KNOWN_ARCHITECTURES.items()}
    if name.lower() not in known:
        raise MoonError(
            f"model.name_or_path: `moon-rl plan` does not know the shape of {name!r}: it is neither a local folder "
            f"with a config.json nor one of {', '.join(KNOWN_ARCHITECTURES)}; point it at a downloaded model folder"
        )
    return known[name.lower()]


@dataclass(frozen=True)
class StagePlan:
    """One training stage: micro batch size, trainable parameters (heads included), GiB per device, warnings."""

    stage: str
    rows: int
    seq: int
    checkpointing: bool
    trainable: int
    parts: dict[str, float]
    total: float
    notes: list[str] = field(default_factory=list)


def plan_recipe(recipe: Recipe, gpus: int = 1, strategy: str = "ddp", gpu_memory_gib: float = 80.0,
                prompt_tokens: int = 128) -> tuple[Architecture, list[StagePlan]]:
    """GiB per device of each training stage in `recipe.stages` (module doc); MoonError: bad model, strategy, stages."""
    from moon_rl.training.config_checks import config_fields, config_value

    if strategy not in STRATEGIES:
        raise MoonError(f"--strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    stages = [s for s in ("sft", "grpo") if s in recipe.stages]
    if not stages:
        raise MoonError(f"stages {recipe.stages}: `moon-rl plan` sizes the training stages (sft, grpo); none listed")
    arch, model, quant = architecture(recipe.model), recipe.model, recipe.model.quantization
    (total_params, _, linear_weights), h, fire = arch.params(), arch.hidden, recipe.model.heads.fire
    dtype = arch.dtype if model.dtype == "auto" else model.dtype
    act = _BYTES[quant.compute_dtype if quant is not None else dtype]
    weights = total_params * _BYTES[dtype]
    if quant is not None:  # nf4/fp4: 0.5 byte + an fp32 absmax per 64 weights (8-bit, + fp32 per 256, double quant)
        per_weight = 1.0 if quant.bits == 8 else 0.5 + (1 / 64 + 4 / (64 * 256) if quant.double_quant else 4 / 64)
        weights = linear_weights * per_weight + (total_params - linear_weights) * 4
    if model.lora is not None:
        pattern = re.compile(model.lora.target_modules)
        adapted = [(name, a, b) for name, a, b, _ in arch.linears() if pattern.fullmatch(name)]
        trainable, train_bytes = sum(model.lora.r * (a + b) for _, a, b in adapted), 2 if quant else 4
        per_input = train_bytes + (model.lora.dropout > 0)  # peft's cast copy (+ dropout mask) of each input
        lora_text = per_input * sum(a for name, a, _ in adapted if ".visual." not in name)  # per token, all layers
        lora_vision = per_input * sum(a for name, a, _ in adapted if ".visual." in name)
        vision_trains, full_ft = lora_vision > 0, 0
    else:  # trained weights also keep their linear layers' inputs (full_ft)
        trainable, train_bytes, vision_trains, full_ft = total_params, _BYTES[dtype], True, 1
        lora_text = lora_vision = 0
    fire_layers = len(fire.layers) if fire.layers is not None else len({*range(3, arch.layers, 4), arch.layers - 1})
    heads = h * model.heads.embed_dim + (9 * h * h + 20 * h if model.heads.fusion.enabled else 0)
    heads += 2 * h * fire.rank * fire_layers if fire.enabled else 0
    image_tokens = model.image_max_pixels // (arch.patch * arch.merge) ** 2 * recipe.data.max_images_per_product
    completion = config_value("grpo", recipe.grpo, "max_completion_length") or 0
    shard_static, shard_states = (gpus if strategy in ("zero3", "fsdp") else 1), (1 if strategy == "ddp" else gpus)
    kv, vh, vi, i = arch.kv_heads * arch.head_dim, arch.vision_hidden, arch.vision_intermediate, arch.intermediate
    # Activation bytes per token and layer (module doc), the adapted linears' inputs included.
    layer = 8 * h + act * (2 * h + 2 * kv + 3 * i + full_ft * (5 * h + i)) + lora_text / arch.layers
    v_layer = 8 * vh + act * (4 * vh + 3 * vi + full_ft * (5 * vh + vi)) + lora_vision / arch.vision_depth
    plans: list[StagePlan] = []
    for stage in stages:
        get = functools.partial(config_value, stage, getattr(recipe, stage))  # the field's value or its default
        seq, rows = prompt_tokens + image_tokens + completion, get("per_device_train_batch_size")
        if stage == "sft":
            per_pair = 3 + get("hard_negatives") + bool(get("chain_negatives")) + bool(get("photo_traces"))
            rows, seq = rows * per_pair, min(seq, get("max_length") or seq)
        eager = act * arch.heads * seq if model.attn_implementation == "eager" else 0
        full = rows * seq * arch.layers * (layer + eager)
        ckpt = rows * seq * (arch.layers * act * h + 1.5 * (layer + eager))
        if vision_trains:  # patches x vision blocks, the same per-token formula
            patches = rows * image_tokens * arch.merge**2
            full += patches * arch.vision_depth * v_layer
            ckpt += patches * (arch.vision_depth * act * vh + 1.5 * v_layer)
        state_bytes = 12 if strategy in ("zero2", "zero3") else (2 if "8bit" in str(get("optim")) else 2 * train_bytes)
        parts = {
            "weights": weights / shard_static,
            "LoRA adapters + heads": ((trainable * train_bytes if model.lora else 0) + heads * 4) / shard_static,
            "optimizer (AdamW)": (trainable * state_bytes + heads * 8) / shard_states,
            "gradients": (trainable * train_bytes + heads * 4) / shard_states,
            "activations, no checkpointing": full,
            "activations, checkpointing": ckpt,
            "generation KV cache": 0.0, "reference model": 0.0, "vLLM share": 0.0,
        }
        notes: list[str] = []
        if stage == "grpo":
            steps = get("steps_per_generation") or get("gradient_accumulation_steps")
            generation_rows = (get("generation_batch_size") or 0) // gpus or rows * steps
            if not get("use_vllm"):
                parts["generation KV cache"] = generation_rows * seq * arch.layers * 2 * kv * act
            elif get("vllm_mode") == "colocate":
                parts["vLLM share"] = get("vllm_gpu_memory_utilization") * gpu_memory_gib * GIB
                if parts["vLLM share"] < total_params * 2 * 1.2:  # vLLM holds its own 16-bit weights + a KV cache
                    notes.append("the vLLM share barely holds vLLM's weights; raise grpo.vllm_gpu_memory_utilization")
            if model.lora is None and (get("beta") or 0) > 0:
                parts["reference model"] = weights / shard_static
        parts = {key: value / GIB for key, value in parts.items()}
        # transformers 5.23 renamed gradient_checkpointing (TRL's default: on) to activation_checkpointing, which wins.
        new = get("activation_checkpointing") if "activation_checkpointing" in config_fields(stage) else None
        ckpt_on = bool(get("gradient_checkpointing") if new is None else new)
        used = parts["activations, checkpointing" if ckpt_on else "activations, no checkpointing"]
        total = sum(v for k, v in parts.items() if not k.startswith(("activations", "generation")))
        total += max(used, parts["generation KV cache"])
        if total > gpu_memory_gib:
            notes.append(f"about {total:.1f} GiB per device, more than {gpu_memory_gib:g} GiB")
        plans.append(StagePlan(stage, rows, seq, ckpt_on, trainable + heads, parts, total, notes))
    return arch, plans


def format_plan(recipe: Recipe, arch: Architecture, plans: list[StagePlan], gpus: int, strategy: str,
                gpu_memory_gib: float) -> str:
    """The plan as text: the model in one line, then a markdown table of GiB per device, one column per stage."""
    (total, vision, _), model = arch.params(), recipe.model

    def count(n: float) -> str:
        return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"

    quant = f", {model.quantization.bits}-bit {model.quantization.quant_type}" if model.quantization else ""
    lora = f", LoRA r={model.lora.r}" if model.lora else ", full fine-tuning"
    lora += f" ({count(plans[0].trainable)} trainable parameters with the heads)"
    lines = [
        f"model {model.name_or_path} ({arch.model_type}): {count(total)} parameters (vision {count(vision)})"
        f", hidden {arch.hidden}, {arch.layers} layers, vocab {arch.vocab}; "
        f"{arch.dtype if model.dtype == 'auto' else model.dtype}{quant}{lora}",
        f"{strategy} on {gpus} GPU(s) of {gpu_memory_gib:g} GiB; estimates (formulas: moon_rl/plan.py)", "",
        "| GiB per device | " + " | ".join(p.stage for p in plans) + " |",
        "|---|" + "---:|" * len(plans),
        "| micro batch (rows x tokens) | " + " | ".join(f"{p.rows} x {p.seq}" for p in plans) + " |",
    ]
    for key in plans[0].parts:
        cells = [f"{p.parts[key]:.2f}" + " *" * (key == f"activations, {'' if p.checkpointing else 'no '}checkpointing")
                 for p in plans]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["| **total** | " + " | ".join(f"**{p.total:.2f}**" for p in plans) + " |", "",
              "* the activations of the recipe's gradient_checkpointing setting, counted in the total"]
    lines += [f"warning: {p.stage}: {note}" for p in plans for note in p.notes]
    return "\n".join(lines)
