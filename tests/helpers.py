"""Helpers shared by the test modules (not a test module itself)."""

from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: The `grpo` section of a small end-to-end recipe: 2 CPU steps of 8 prompts (2 completions each) from any model,
#: after `tiny_sft_recipe`.
TINY_GRPO_SECTION = (
    "grpo: {bf16: false, use_cpu: true, report_to: none, allow_untrained_reasoning: true, per_device_train_batch_size: 8,"
    " num_generations: 2,\n"
    "       max_completion_length: 8, max_steps: 2, logging_steps: 1, save_steps: 2, beta: 0.0,\n"
    "       gradient_checkpointing: false, disable_tqdm: true}\n"
)


def tiny_sft_recipe(run_dir: Path, *, max_steps: int, save_steps: int, batch_size: int = 8) -> str:
    """The head of a small end-to-end recipe: output folder, tiny model, 48-product catalogue, a short CPU SFT stage.

    Tests append their own `grpo`, `embed` and `eval` sections.
    """
    return (
        f"output_dir: {run_dir}\n"
        "model: {lora: null, heads: {embed_dim: 32}}\n"
        "data: {synthetic: {n_products: 48, seed: 3, image_size: 56}}\n"
        f"sft: {{bf16: false, use_cpu: true, report_to: none, per_device_train_batch_size: {batch_size}, "
        "learning_rate: 1.0e-3,\n"
        f"      max_steps: {max_steps}, logging_steps: 1, save_steps: {save_steps}, gradient_checkpointing: false, "
        "max_length: null,\n"
        "      dataloader_num_workers: 0, disable_tqdm: true}\n"
    )


def served_index(folder: Path, catalogue_dir: Path, *, embed_dim: int = 32, dim: int | None = None):
    """A tiny model saved to `folder/model` and its index of the catalogue `catalogue_dir` (read only) in
    `folder/index`, the way `moon-rl embed --model` writes it (the index records the model folder and the catalogue).
    The tests pass a small synthetic catalogue from the `synthetic_catalogue` fixture (24 products, seed 0, 56 px).

    Returns `(index_dir, embedder, catalogue)`; the tests of `moon-rl serve` start the service on it. `dim`: the
    index holds that Matryoshka prefix of each vector (`embed --dim`).
    """
    from types import SimpleNamespace as NS

    from moon_rl.data.catalogue import load_catalogue
    from moon_rl.inference.pipeline import embed_catalogue
    from moon_rl.modeling.embedder import MoonEmbedder, heads_config_for
    from moon_rl.modeling.heads import MoonHeads
    from moon_rl.modeling.loading import load_backbone
    from moon_rl.recipe.schema import HeadsSpec

    spec = NS(name_or_path="builtin:tiny-vl", builtin_size="tiny", dtype="float32", trust_remote_code=False,
              attn_implementation="sdpa", quantization=None, lora=None, image_min_pixels=56 * 56,
              image_max_pixels=112 * 112,
              heads=HeadsSpec(embed_dim=embed_dim, matryoshka_dims=[dim] if dim else None))
    model, processor = load_backbone(spec)
    embedder = MoonEmbedder(model, processor, MoonHeads(heads_config_for(model, spec.heads)), max_new_tokens=16,
                            meta={"base_model": "builtin:tiny-vl", "builtin_size": "tiny"}).eval()
    model_dir = embedder.save(folder / "model")
    catalogue = load_catalogue(catalogue_dir)
    embed_catalogue(embedder, catalogue, folder / "index", batch_size=16, show_progress=False, model_dir=model_dir,
                    dim=dim)
    return folder / "index", embedder, catalogue
