"""`MoonEmbedder`: backbone VLM (+ LoRA, optionally 4-bit) + `MoonHeads` = the one definition of the embedding.

SFT, GRPO, `moon-rl embed` and `moon-rl eval` all embed through this class (DESIGN.md section 4):

    prompt (images + text) [+ "<think>...</think>"] + <|im_end|>  --backbone-->  last hidden state at <|im_end|>
        --fusion (raw image / text tokens)-->  --projection-->  L2-normalised vector

`direct` mode has an empty assistant turn; `reason` mode generates the reasoning first. FIRE acts inside the backbone
through hooks (modeling/taps.py), so it shapes both generation and the read-out.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from moon_rl.cache import atomic_dir, atomic_write_text
from moon_rl.errors import MoonError
from moon_rl.modeling.folder import HEADS_CONFIG, HEADS_WEIGHTS, MODEL_MANIFEST
from moon_rl.modeling.generation import hf_generate
from moon_rl.modeling.heads import HeadsConfig, MoonHeads, default_fire_layers
from moon_rl.modeling.inputs import (
    EmbedItem,
    ImageLoader,
    PromptBatch,
    assemble,
    batch_order_key,
    fit_images,
    to_item,
    tokenize_prompts,
)
from moon_rl.modeling.matryoshka import check_range, truncate
from moon_rl.modeling.taps import (
    BackboneTaps,
    ForwardRecord,
    backbone_of,
    compact,
    decoder_layers_of,
    unwrap_hf_model,
)

if TYPE_CHECKING:
    from moon_rl.modeling.spec import HeadsSpec, ModelSpec
    from moon_rl.recipe import Recipe  # types only: modeling must not need the recipe package at import time

Mode = Literal["direct", "reason"]
FORMAT_VERSION = 1
MODES: tuple[str, ...] = ("direct", "reason")


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode (dropout off) inside the block, its own mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def heads_config_for(model: nn.Module, heads_spec: HeadsSpec) -> HeadsConfig:
    """`HeadsConfig` from a recipe's `model.heads` section and the backbone's shape."""
    text_config = unwrap_hf_model(model).config.get_text_config()
    layers = heads_spec.fire.layers
    if layers is None:
        layers = default_fire_layers(len(decoder_layers_of(model)))
    return HeadsConfig(
        hidden_size=text_config.hidden_size, embed_dim=heads_spec.embed_dim,
        fusion=heads_spec.fusion.enabled, fusion_heads=heads_spec.fusion.num_heads,
        fusion_chain=heads_spec.fusion.chain,
        fire=heads_spec.fire.enabled, fire_layers=list(layers), fire_rank=heads_spec.fire.rank,
        matryoshka_dims=list(heads_spec.matryoshka_dims or []),
    )


class MoonEmbedder(nn.Module):
    """Reason-then-embed product embedder.

    Args:
        model (`PreTrainedModel` or `PeftModel`): the backbone VLM (Qwen2-VL family).
        processor (`ProcessorMixin`): its multimodal processor.
        heads (`MoonHeads`): fusion, FIRE and projection.
        readout_token (`str`, *optional*, defaults to `"<|im_end|>"`): the token whose last-layer state is read out;
            it closes the assistant turn.
        max_images (`int`, *optional*, defaults to `4`): images per product shown to the model.
        max_new_tokens (`int`, *optional*, defaults to `96`): reasoning budget in `reason` mode.
        meta (`dict`, *optional*): what `save` records about the base model (`base_model`, `builtin_size`, recipe).

    Example:
        ```python
        embedder = MoonEmbedder.load("runs/tiny-cpu/sft/final")
        vectors = embedder.encode(["red striped cotton shirt"], mode="direct")  # (1, embed_dim) float32
        ```
    """

    def __init__(
        self, model: nn.Module, processor: Any, heads: MoonHeads, *, readout_token: str = "<|im_end|>",
        max_images: int = 4, max_new_tokens: int = 96, meta: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.model = model
        self.processor = processor
        self.heads = heads
        self.max_images = max_images
        self.max_new_tokens = max_new_tokens
        self.meta = dict(meta or {})
        tokenizer = processor.tokenizer
        self.readout_token = readout_token
        self.readout_id = tokenizer.convert_tokens_to_ids(readout_token)
        if self.readout_id is None or self.readout_id == tokenizer.unk_token_id:
            raise MoonError(f"model.readout_token {readout_token!r} is not a token of the model's tokenizer")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.readout_id
        self.image_token_id = unwrap_hf_model(model).config.image_token_id
        special = set(tokenizer.all_special_ids) | {self.image_token_id, self.readout_id, self.pad_id}
        self.register_buffer("_special_ids", torch.tensor(sorted(special)), persistent=False)
        self.taps = BackboneTaps(model, heads, self.image_token_id)
        #: "hf" (transformers generate) or "vllm" (GPU; needs vllm installed and a full-weight model folder).
        self.generation_backend = "hf"
        self._vllm = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_recipe(cls, recipe: Recipe, *, model: nn.Module | None = None, processor: Any = None) -> MoonEmbedder:
        """Fresh embedder (untrained heads) for `recipe`: backbone from `model.name_or_path`, LoRA, quantization."""
        from moon_rl.modeling.loading import load_backbone

        if model is None or processor is None:
            model, processor = load_backbone(recipe.model)
        heads = MoonHeads(heads_config_for(model, recipe.model.heads))
        meta = {"base_model": recipe.model.name_or_path, "builtin_size": recipe.model.builtin_size,
                "recipe": recipe.to_yaml(), "model_spec": recipe.model.model_dump(mode="json")}
        return cls(model, processor, heads, readout_token=recipe.model.readout_token,
                   max_images=recipe.data.max_images_per_product, max_new_tokens=recipe.embed.max_new_tokens, meta=meta)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ batching
    def prepare(
        self, items: Sequence[EmbedItem] | None, completions: Sequence[Sequence[int]] | None = None,
        padding_side: Literal["left", "right"] = "left", prompts: PromptBatch | None = None,
    ) -> dict[str, torch.Tensor]:
        """Model inputs for `items` (or ready `prompts`) with `completions` (token ids; empty = direct mode) and the
        read-out token."""
        if prompts is None:
            if items is None:
                raise ValueError("prepare needs `items` or tokenised `prompts`")
            prompts = tokenize_prompts(self.processor, items)
        completions = completions if completions is not None else [[] for _ in prompts.prompt_ids]
        return assemble(prompts, completions, self.readout_id, self.pad_id, self.image_token_id, padding_side)

    def tokenize_reasoning(self, traces: Sequence[str | None]) -> list[list[int]]:
        """Token ids of `<think>trace</think>` completions (empty for None: direct mode)."""
        from moon_rl.data.prompts import format_reasoning

        tok = self.processor.tokenizer
        return [[] if t is None else tok(format_reasoning(t), add_special_tokens=False)["input_ids"] for t in traces]

    # ------------------------------------------------------------------ embedding
    def embed_record(self, record: ForwardRecord, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings (B, embed_dim) from what the hooks captured in one backbone forward over `batch`."""
        hidden = record.last_hidden
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        readout = hidden[rows, batch["readout_index"].to(hidden.device)]
        if self.heads.fusion is None:
            return self.heads(readout)
        image_tokens, image_mask = record.visual_tokens(self.image_token_id)
        input_ids = batch["input_ids"].to(hidden.device)
        prompt_mask = batch["prompt_mask"].to(hidden.device)
        words = batch["attention_mask"].to(hidden.device).bool() & ~torch.isin(input_ids, self._special_ids.to(hidden.device))
        text_tokens, text_mask = compact(record.token_embeds, prompt_mask & words)
        if self.heads.fusion is None or self.heads.fusion.chain_attn is None:
            return self.heads(readout, image_tokens, image_mask, text_tokens, text_mask)
        # The chain: what the model wrote after the prompt (its words, before the read-out position).
        positions = torch.arange(input_ids.shape[1], device=hidden.device)
        chain = ~prompt_mask & words & (positions[None] < batch["readout_index"].to(hidden.device)[:, None])
        chain_tokens, chain_mask = compact(record.token_embeds, chain)
        return self.heads(readout, image_tokens, image_mask, text_tokens, text_mask, chain_tokens, chain_mask)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings (B, embed_dim) of a prepared batch, with gradients (one backbone forward, no LM head)."""
        model_inputs = {k: v.to(self.device) for k, v in batch.items() if k not in ("prompt_mask", "readout_index")}
        with self.taps.capture() as records:
            backbone_of(self.model)(**model_inputs, use_cache=False)
        return self.embed_record(records[-1], batch)

    def generate_reasoning(
        self, items: Sequence[EmbedItem], *, prompts: PromptBatch | None = None, max_new_tokens: int | None = None,
        do_sample: bool = False, temperature: float = 1.0,
    ) -> list[list[int]]:
        """Reasoning completions (token ids, without the end-of-turn token) for `items`."""
        prompts = prompts or tokenize_prompts(self.processor, items)
        if self.generation_backend == "vllm":
            return self._vllm_generator().generate(
                prompts.prompt_ids, [fit_images(self.processor, item.images) for item in items], max_new_tokens=max_new_tokens or self.max_new_tokens,
                temperature=temperature if do_sample else 0.0,
            )
        with eval_mode(self.model):
            return hf_generate(
                self.model, prompts, pad_id=self.pad_id, eos_id=self.readout_id, image_token_id=self.image_token_id,
                max_new_tokens=max_new_tokens or self.max_new_tokens, do_sample=do_sample, temperature=temperature,
            )

    def _vllm_generator(self):
        """vLLM engine over this model's full weights (FIRE is not applied inside vLLM; the read-out forward has it)."""
        from moon_rl.modeling.generation import VLLMGenerator

        if self._vllm is None:
            inner = self.model.module if hasattr(self.model, "module") else self.model
            if hasattr(inner, "peft_config"):
                # vLLM loads full weights by path: the adapter merged into a copy, in a folder removed with the embedder.
                from moon_rl.modeling.loading import write_merged_model

                folder = Path(tempfile.mkdtemp(prefix="moon-rl-vllm-"))
                weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
                source = str(write_merged_model(inner, self.processor, folder))
            else:
                source = unwrap_hf_model(self.model).name_or_path
            self._vllm = VLLMGenerator(source)
        return self._vllm

    def preprocess(self, items: Sequence[EmbedItem]) -> PromptBatch:
        """The CPU half of embedding a batch (chat template, tokenizer, image processor), for `embed_prompts`.

        `moon-rl embed` runs it in DataLoader workers, where it overlaps the model's forward on the previous batch.
        """
        return tokenize_prompts(self.processor, items)

    @torch.inference_mode()
    def embed_prompts(self, prompts: PromptBatch, mode: Mode = "direct", *, items: Sequence[EmbedItem] | None = None,
                      dim: int | None = None) -> np.ndarray:
        """Float32 vectors (rows in `prompts` order) of a batch `preprocess` prepared: in reason mode the model first
        writes its reasoning (greedy). `items`: the batch's items, needed by the vLLM backend only (it takes images,
        not pixel values). `dim`: as in `encode`."""
        with eval_mode(self):
            completions = self.generate_reasoning(items or [], prompts=prompts) if mode == "reason" else None
            vectors = self(self.prepare(None, completions, prompts=prompts)).float().cpu().numpy()
        return truncate(vectors, dim)

    @torch.inference_mode()
    def encode(
        self, records: Sequence[Any], mode: Mode = "direct", batch_size: int = 32, *,
        load_image: ImageLoader | None = None, show_progress: bool = False, padding_side: Literal["left", "right"] = "left",
        return_completions: bool | Literal["ids"] = False, completions: Sequence[Sequence[int]] | None = None,
        do_sample: bool = False, temperature: float = 1.0, dim: int | None = None,
    ) -> np.ndarray | tuple[np.ndarray, list[str]] | tuple[np.ndarray, list[list[int]]]:
        """Embed records (Products, Queries, `{text, image}` dicts, strings, PIL images) into a float32 matrix.

        Batches are sorted by prompt length (less padding); rows come back in input order. Images are decoded one batch
        at a time, so a large catalogue never sits in memory. In `reason` mode the model first writes its reasoning
        (greedy, or sampled at `temperature` with `do_sample=True`), unless `completions` (token ids per record, e.g.
        another record's reasoning) are given; `return_completions=True` also returns the decoded traces, `"ids"`
        their token ids. `dim` keeps the first `dim` values of each vector, renormalised (Matryoshka; see
        `moon_rl.modeling.matryoshka`).
        """
        if mode not in MODES:
            raise MoonError(f"mode must be one of {MODES}, got {mode!r}")
        check_range(dim, self.heads.config.embed_dim)
        order = sorted(range(len(records)), key=lambda i: batch_order_key(records[i], self.max_images))
        out = np.zeros((len(records), self.heads.config.embed_dim), dtype=np.float32)
        if completions is not None and len(completions) != len(records):
            raise MoonError(f"completions: got {len(completions)} for {len(records)} records")
        traces: list[Any] = [[] if return_completions == "ids" else ""] * len(records)
        with eval_mode(self), tqdm(total=len(records), desc=f"embed ({mode})", unit="item",
                                   disable=not show_progress) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch_items = [to_item(records[i], load_image, self.max_images) for i in idx]
                prompts = tokenize_prompts(self.processor, batch_items)
                batch_completions = None
                if mode == "reason":
                    batch_completions = ([list(completions[i]) for i in idx] if completions is not None else
                                         self.generate_reasoning(batch_items, prompts=prompts, do_sample=do_sample,
                                                                 temperature=temperature))
                batch = self.prepare(batch_items, batch_completions, padding_side=padding_side, prompts=prompts)
                out[idx] = self(batch).float().cpu().numpy()
                if return_completions and batch_completions is not None:
                    decoded = (batch_completions if return_completions == "ids" else
                               self.processor.tokenizer.batch_decode(batch_completions, skip_special_tokens=False))
                    for i, trace in zip(idx, decoded, strict=True):
                        traces[i] = trace
                bar.update(len(idx))
        out = truncate(out, dim)
        return (out, traces) if return_completions else out

    # ------------------------------------------------------------------ artifacts
    def save(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write adapter (or full weights), heads, processor, resolved recipe and `moon_rl.json`, atomically.

        `state_dict`: the model's weights gathered from sharded training (FSDP, DeepSpeed ZeRO-3), where the model's own
        parameters hold only this process's shard.
        """
        path = Path(path)
        with atomic_dir(path) as tmp:
            inner = self.model.module if hasattr(self.model, "module") else self.model
            if hasattr(inner, "peft_config"):
                inner.save_pretrained(tmp / "adapter", state_dict=state_dict)
                weights = "adapter"
            else:
                inner.save_pretrained(tmp / "model", state_dict=state_dict)
                # A complete HF folder beside the weights: vLLM (and TRL's vLLM when GRPO starts from this model) loads
                # `model/` by path and needs the tokenizer and processor there, with the recipe's pixel range.
                self.processor.save_pretrained(tmp / "model")
                weights = "full"
            self.processor.save_pretrained(tmp / "processor")
            save_file({k: v.detach().float().cpu().contiguous() for k, v in self.heads.state_dict().items()},
                      str(tmp / HEADS_WEIGHTS))
            atomic_write_text(tmp / HEADS_CONFIG, json.dumps(self.heads.config.to_dict(), indent=2))
            if self.meta.get("recipe"):
                atomic_write_text(tmp / "recipe.yaml", self.meta["recipe"])
            atomic_write_text(tmp / MODEL_MANIFEST, json.dumps(self._manifest(weights), indent=2))
        return path

    def _manifest(self, weights: str) -> dict[str, Any]:
        import transformers

        import moon_rl

        return {
            "format_version": FORMAT_VERSION, "weights": weights,
            "base_model": self.meta.get("base_model"), "builtin_size": self.meta.get("builtin_size"),
            "model_type": unwrap_hf_model(self.model).config.model_type,
            "readout_token": self.readout_token, "modes": list(MODES), "embed_dim": self.heads.config.embed_dim,
            "max_images": self.max_images, "max_new_tokens": self.max_new_tokens,
            # Whether SFT trained the reasoning (null: unknown); GRPO's preflight refuses a model that never saw traces.
            "reasoning_trained": self.meta.get("reasoning_trained"),
            # The `model` section it was built with: loading needs no recipe (null: built by hand, defaults).
            "model_spec": self.meta.get("model_spec"),
            "versions": {"moon_rl": moon_rl.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
        }

    @classmethod
    def load(cls, path: str | Path, *, model_spec: ModelSpec | None = None, trainable: bool = False) -> MoonEmbedder:
        """Restore an embedder written by `save` (safetensors only; no pickle).

        `trainable=True` keeps a LoRA adapter trainable (to continue training it, e.g. GRPO after SFT).
        """
        from moon_rl.modeling.loading import load_model, load_processor, resolve_model_path

        path = Path(path)
        manifest_path = path / MODEL_MANIFEST
        if not path.exists():
            raise MoonError(f"{path}: no such model folder")
        if not manifest_path.is_file():
            raise MoonError(f"{path}: not a moon-rl model folder (no moon_rl.json)")
        manifest = json.loads(manifest_path.read_text())
        if model_spec is None:
            model_spec = model_spec_for(path, manifest)
        processor = load_processor(path / "processor", model_type=manifest["model_type"],
                                   trust_remote_code=model_spec.trust_remote_code)
        if manifest["weights"] == "full":
            model = load_model(path / "model", model_spec)
        else:
            from peft import PeftModel

            base = load_model(resolve_model_path(model_spec), model_spec)
            model = PeftModel.from_pretrained(base, str(path / "adapter"), is_trainable=trainable)
        heads = MoonHeads(HeadsConfig(**json.loads((path / HEADS_CONFIG).read_text())))
        heads.load_state_dict(load_file(str(path / HEADS_WEIGHTS)))
        meta = {"base_model": manifest["base_model"], "builtin_size": manifest["builtin_size"],
                "reasoning_trained": manifest.get("reasoning_trained"),  # absent before the preflight existed
                # A spec passed by hand may be any object with the fields; it is kept only when it can be saved.
                "model_spec": (model_spec.model_dump(mode="json") if hasattr(model_spec, "model_dump")
                               else manifest.get("model_spec"))}
        if (path / "recipe.yaml").is_file():
            meta["recipe"] = (path / "recipe.yaml").read_text()
        embedder = cls(model, processor, heads, readout_token=manifest["readout_token"],
                       max_images=manifest["max_images"], max_new_tokens=manifest["max_new_tokens"], meta=meta)
        return embedder.train() if trainable else embedder.eval()


def model_spec_for(path: Path, manifest: dict[str, Any]) -> ModelSpec:
    """The model spec a saved model was built with: its `moon_rl.json`'s `model_spec`; for folders saved before it was
    kept there, the `model` section of the resolved recipe saved beside it; defaults when neither exists."""
    import yaml

    from moon_rl.modeling.spec import ModelSpec

    if manifest.get("model_spec") is not None:
        spec = ModelSpec.model_validate(manifest["model_spec"])
    else:
        recipe_file = path / "recipe.yaml"
        saved = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) if recipe_file.is_file() else None
        spec = ModelSpec.model_validate((saved or {}).get("model") or {})
    if manifest.get("base_model"):
        spec = spec.model_copy(update={"name_or_path": manifest["base_model"],
                                       "builtin_size": manifest.get("builtin_size") or spec.builtin_size})
    return spec
