"""Helpers shared by the test modules (not a test module itself)."""

from __future__ import annotations

import importlib
import socket
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parents[1] / "bench"


def import_bench(name: str) -> ModuleType:
    """The script `bench/<name>.py` as a module. bench/ is on `sys.path` only while it imports: its scripts import
    their siblings (`results_md`) that way, and nothing else should find them."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: What every stage of a test recipe runs with: full precision on the CPU, no reporting, no progress bars, and a log
#: line every step (the tests read `log_history.json`).
_CPU_STAGE = {"bf16": False, "use_cpu": True, "report_to": "none", "gradient_checkpointing": False,
              "disable_tqdm": True, "logging_steps": 1}
#: Each section's defaults, which the caller's dict is merged over.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"lora": None, "heads": {"embed_dim": 32}},
    "synthetic": {"n_products": 48, "seed": 3, "image_size": 56},
    "sft": {**_CPU_STAGE, "dataloader_num_workers": 0},
    "grpo": dict(_CPU_STAGE),
    "eval": {"modes": ["direct"], "baselines": []},
}

#: The short SFT stage most end-to-end tests train: batches of 8 pairs at learning rate 1e-3, no truncation. Add
#: `max_steps` and `save_steps`.
TINY_SFT: dict[str, Any] = {"per_device_train_batch_size": 8, "learning_rate": 1.0e-3, "max_length": None}
#: The short GRPO stage of the end-to-end tests: 2 steps of 8 prompts, 2 completions of 8 tokens each, from any model.
TINY_GRPO: dict[str, Any] = {"allow_untrained_reasoning": True, "per_device_train_batch_size": 8, "num_generations": 2,
                             "max_completion_length": 8, "max_steps": 2, "save_steps": 2, "beta": 0.0}


class _PlainDumper(yaml.SafeDumper):
    """`yaml.safe_dump` without anchors: an object met twice (a shared default) is written out twice."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` applied: nested dicts merge key by key, any other value replaces the old one."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_recipe(
    output_dir: str | Path | None = None,
    *,
    catalogue: str | Path | None = None,
    synthetic: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    sft: dict[str, Any] | None = None,
    grpo: dict[str, Any] | None = None,
    eval: dict[str, Any] | None = None,
    **sections: Any,
) -> str:
    """The YAML text of a small test recipe: the tiny builtin model, a small catalogue, short CPU stages.

    Each argument is merged over its section's defaults (nested dicts key by key), so a test names only what it
    changes; `yaml.safe_load` of the text gives back the merged sections.

    Args:
        output_dir (`str | Path`, *optional*): the run's folder; left out, the recipe's default (or an override).
        catalogue (`str | Path`, *optional*): `data.catalogue`, a catalogue folder; without it the data is the builtin
            48-product synthetic catalogue (`data.synthetic`: 48 products, seed 3, 56-pixel images).
        synthetic (`dict`, *optional*): changes to those synthetic options (not with `catalogue`).
        data (`dict`, *optional*): more keys of the `data` section (`columns`, `splits`, ...).
        model (`dict`, *optional*): changes to the model, `{lora: null, heads: {embed_dim: 32}}` (no LoRA, 32-d
            embeddings).
        sft (`dict`, *optional*): the `sft` stage, over the CPU defaults (`bf16: false`, `use_cpu: true`, `report_to:
            none`, `gradient_checkpointing: false`, `disable_tqdm: true`, `logging_steps: 1`,
            `dataloader_num_workers: 0`). `{}` for the defaults alone; left out, the recipe has no `sft` section.
        grpo (`dict`, *optional*): the `grpo` stage, over the same CPU defaults (without `dataloader_num_workers`);
            left out, no `grpo` section.
        eval (`dict`, *optional*): the `eval` section, over `{modes: [direct], baselines: []}`; left out, none.
        **sections: any other top-level key (`embed`, `stages`, ...), written as given.

    Returns:
        `str`: the recipe as `yaml.safe_dump` writes it (without anchors), in the order `output_dir`, `model`, `data`,
        `sft`, `grpo`, `eval`, then `sections`.

    Example:
        ```python
        tiny_recipe(tmp_path / "run", sft={**TINY_SFT, "max_steps": 4, "save_steps": 2}, eval={})
        ```
    """
    if catalogue is not None and synthetic is not None:
        raise ValueError("tiny_recipe: `synthetic` options apply to the builtin catalogue, not to `catalogue`")
    recipe: dict[str, Any] = {} if output_dir is None else {"output_dir": str(output_dir)}
    recipe["model"] = _merged(_DEFAULTS["model"], model or {})
    source = ({"catalogue": str(catalogue)} if catalogue is not None
              else {"synthetic": _merged(_DEFAULTS["synthetic"], synthetic or {})})
    recipe["data"] = {**source, **(data or {})}
    for name, changes in (("sft", sft), ("grpo", grpo), ("eval", eval)):
        if changes is not None:
            recipe[name] = _merged(_DEFAULTS[name], changes)
    recipe.update(sections)
    return yaml.dump(recipe, Dumper=_PlainDumper, sort_keys=False)


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
