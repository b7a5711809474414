"""Throughput of `MoonEmbedder.encode(mode="direct")` against a bare loop of the backbone forward.

    python bench/embed_throughput.py [--size tiny|small] [--n 256] [--batch-size 32] [--repeats 5] [--breakdown]

Both sides embed the same synthetic catalogue products (text + one image, decoded once before timing) in the same
batches (encode's length-sorted order and batch size):

* moon-rl: `embedder.encode(items, mode="direct")`, timed end to end, so it includes what a user pays: chat
  template + processor (tokenisation, image patching), batch assembly, the hooked backbone forward (raw-signal taps,
  FIRE), the heads and the copy to numpy.
* bare: the loop a user would write with plain transformers on a second, hook-free copy of the same weights: chat
  template + processor on the same items, `backbone_of(model)(**inputs, use_cache=False)` under
  `torch.inference_mode()`, last-token pooling and L2 normalisation. The ratio of the two is moon-rl's overhead.
* forward-only (printed for reference): the bare backbone forward on inputs tokenised OUTSIDE the timed region. On
  the ~1M-parameter tiny model the forward is so cheap that the (shared) preprocessing dominates this ratio; it
  approaches the end-to-end ratio as the model grows (`--size small`).

The sides alternate (A/B, then B/A) `--repeats` times; each repetition is printed and the median end-to-end ratio
`moonrl_items_per_s / bare_items_per_s` comes last. `--breakdown` also times encode's stages separately.

`--workers 0 1 2` then times `moon-rl embed`'s own loop (`embed_catalogue` on the same catalogue, images decoded
inside the timed region, files written) with that many DataLoader preprocessing workers, the settings in turn within
each repetition: the gain of overlapping preprocessing with the forward, as the median ratio to 0 workers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from moon_rl.data.catalogue import Catalogue, load_catalogue  # noqa: E402
from moon_rl.data.synthetic import SyntheticConfig, synthesize  # noqa: E402
from moon_rl.modeling.embedder import MoonEmbedder, heads_config_for  # noqa: E402
from moon_rl.modeling.heads import MoonHeads  # noqa: E402
from moon_rl.modeling.inputs import EmbedItem, batch_order_key, to_item, tokenize_prompts  # noqa: E402
from moon_rl.modeling.loading import load_backbone  # noqa: E402
from moon_rl.modeling.taps import backbone_of  # noqa: E402
from moon_rl.recipe.schema import HeadsSpec  # noqa: E402


def model_spec(size: str, embed_dim: int) -> Any:
    """A recipe-like `model` section: builtin backbone, full weights (no LoRA), fusion + FIRE heads on."""
    return NS(name_or_path="builtin:tiny-vl", builtin_size=size, dtype="float32", trust_remote_code=False,
              attn_implementation="sdpa", quantization=None, lora=None, image_min_pixels=56 * 56,
              image_max_pixels=112 * 112, heads=HeadsSpec(embed_dim=embed_dim))  # the recipe's own heads section


def build(size: str, embed_dim: int) -> tuple[MoonEmbedder, torch.nn.Module]:
    """The embedder, and a second hook-free backbone with the same (seeded builtin) weights for the bare loop."""
    spec = model_spec(size, embed_dim)
    model, processor = load_backbone(spec)
    embedder = MoonEmbedder(model, processor, MoonHeads(heads_config_for(model, spec.heads)),
                            meta={"base_model": spec.name_or_path, "builtin_size": size}).eval()
    bare_model, _ = load_backbone(spec)
    return embedder, backbone_of(bare_model).eval()


def synthetic_catalogue(n: int) -> Catalogue:
    folder = Path(tempfile.mkdtemp(prefix="moon-bench-")) / "catalogue"
    synthesize(folder, SyntheticConfig(n_products=n, seed=0, image_size=112))
    return load_catalogue(folder)


def synthetic_items(catalogue: Catalogue, n: int, max_images: int) -> list[EmbedItem]:
    """`n` synthetic products as items with their images already decoded (decoding is not what is measured)."""
    products = list(catalogue.products.values())[:n]
    return [to_item(p, catalogue.image, max_images) for p in products]


def pipeline_rates(embedder: MoonEmbedder, catalogue: Catalogue, workers: list[int], batch_size: int,
                   repeats: int) -> dict[int, list[float]]:
    """Products/s of `embed_catalogue` with each number of preprocessing workers, interleaved per repetition."""
    from moon_rl.inference.pipeline import embed_catalogue

    out = Path(tempfile.mkdtemp(prefix="moon-bench-embed-"))
    rates: dict[int, list[float]] = {w: [] for w in workers}
    for rep in range(repeats + 1):  # the first round warms up (worker start-up code paths, allocator)
        for w in (workers if rep % 2 == 0 else workers[::-1]):
            started = time.perf_counter()
            embed_catalogue(embedder, catalogue, out / f"w{w}", batch_size=batch_size, show_progress=False,
                            num_workers=w)
            if rep:
                rates[w].append(len(catalogue.products) / (time.perf_counter() - started))
    return rates


def encode_batches(items: list[EmbedItem], batch_size: int) -> list[list[EmbedItem]]:
    """The batches `MoonEmbedder.encode` forms (same sort key), so that both sides see identical tensors."""
    order = sorted(range(len(items)), key=lambda i: batch_order_key(items[i]))
    return [[items[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]


def bare_inputs(embedder: MoonEmbedder, batches: list[list[EmbedItem]]) -> list[dict[str, torch.Tensor]]:
    inputs = []
    for batch in batches:
        prepared = embedder.prepare(batch)
        inputs.append({k: v for k, v in prepared.items() if k not in ("prompt_mask", "readout_index")})
    return inputs


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_bare(backbone: torch.nn.Module, inputs: list[dict[str, torch.Tensor]]) -> None:
    with torch.inference_mode():
        for batch in inputs:
            backbone(**batch, use_cache=False)


@torch.inference_mode()
def run_bare_end_to_end(backbone: torch.nn.Module, processor: Any, batches: list[list[EmbedItem]]) -> None:
    """Plain transformers: template + processor + forward + last-token pooling + normalisation, nothing else."""
    for batch in batches:
        texts = [processor.apply_chat_template(i.messages(), add_generation_prompt=True, tokenize=False) + "<|im_end|>"
                 for i in batch]
        images = [im for i in batch for im in i.images]
        inputs = processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, -1]
        torch.nn.functional.normalize(hidden, dim=-1).numpy()


@torch.inference_mode()
def breakdown(embedder: MoonEmbedder, batches: list[list[EmbedItem]]) -> dict[str, float]:
    """Seconds per stage of encode's loop, re-implemented step by step with timers (same calls, same order)."""
    from moon_rl.modeling.inputs import assemble

    stages: dict[str, float] = defaultdict(float)

    def tick(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        stages[name] += time.perf_counter() - start
        return result

    proc = embedder.processor
    for items in batches:
        texts = tick("chat template", lambda items=items: [
            proc.apply_chat_template(i.messages(), add_generation_prompt=True, tokenize=False) for i in items])
        images = [im for i in items for im in i.images]
        tick("processor (tokenise + image patches)",
             lambda texts=texts, images=images: proc(text=texts, images=images or None, padding=True,
                                                     return_tensors="pt"))
        prompts = tick("tokenize_prompts total", lambda items=items: tokenize_prompts(proc, items))
        batch = tick("assemble", lambda prompts=prompts: assemble(
            prompts, [[] for _ in prompts.prompt_ids], embedder.readout_id, embedder.pad_id, embedder.image_token_id, "left"))
        model_inputs = {k: v for k, v in batch.items() if k not in ("prompt_mask", "readout_index")}
        with embedder.taps.capture() as records:
            tick("backbone forward (with taps + FIRE)",
                 lambda model_inputs=model_inputs: backbone_of(embedder.model)(**model_inputs, use_cache=False))
        out = tick("heads (fusion + projection)", lambda batch=batch, rec=records[-1]: embedder.embed_record(rec, batch))
        tick("to numpy", lambda out=out: out.float().cpu().numpy())
    # tokenize_prompts was timed twice (its parts, then whole): report its parts only and the leftover list work.
    whole = stages.pop("tokenize_prompts total")
    parts = stages["chat template"] + stages["processor (tokenise + image patches)"]
    stages["tokenize_prompts other (ids to lists)"] = max(whole - parts, 0.0)
    return dict(stages)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--n", type=int, default=256, help="products to embed per repetition")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--breakdown", action="store_true", help="also time encode's stages separately")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="also time `moon-rl embed`'s loop with these numbers of preprocessing workers (e.g. 0 1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    embedder, bare = build(args.size, args.embed_dim)
    catalogue = synthetic_catalogue(args.n)
    items = synthetic_items(catalogue, args.n, embedder.max_images)
    batches = encode_batches(items, args.batch_size)
    inputs = bare_inputs(embedder, batches)  # outside every timed region
    n = len(items)
    print(f"builtin:tiny-vl size={args.size} n={n} batch_size={args.batch_size} torch_threads={torch.get_num_threads()} "
          f"cpu_count={os.cpu_count()} torch={torch.__version__}")
    print("moon-rl: embedder.encode(items, mode='direct'): template + processor, assembly, hooks/FIRE, heads. "
          "bare: plain transformers template + processor + backbone forward + last-token pooling. forward-only: the "
          "bare forward on inputs pre-tokenised outside the timed region. Images decoded beforehand for all.")

    def moon() -> None:
        embedder.encode(items, mode="direct", batch_size=args.batch_size)

    def bare_loop() -> None:
        run_bare_end_to_end(bare, embedder.processor, batches)

    def forward_only() -> None:
        run_bare(bare, inputs)

    moon(), bare_loop(), forward_only()  # warm-up: allocator, kernels, lazy imports
    ratios: list[float] = []
    forward_ratios: list[float] = []
    for rep in range(args.repeats):
        # Alternate who goes first, so slow drift (thermal, other load) does not favour one side.
        if rep % 2 == 0:
            t_moon, t_bare, t_fwd = timed(moon), timed(bare_loop), timed(forward_only)
        else:
            t_fwd, t_bare, t_moon = timed(forward_only), timed(bare_loop), timed(moon)
        ratios.append(t_bare / t_moon)
        forward_ratios.append(t_fwd / t_moon)
        print(f"rep {rep + 1}: moon-rl {n / t_moon:8.1f} items/s  bare {n / t_bare:8.1f} items/s  "
              f"ratio {ratios[-1]:.3f}   (forward-only {n / t_fwd:8.1f} items/s, ratio {forward_ratios[-1]:.3f})")
    if args.breakdown:
        stages = breakdown(embedder, batches)
        total = sum(stages.values())
        print(f"encode stage breakdown (one pass, {total:.3f}s):")
        for name, seconds in sorted(stages.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<40} {seconds:7.3f}s  {100 * seconds / total:5.1f}%")
    print(f"median forward-only ratio = {statistics.median(forward_ratios):.3f} (reference, see the docstring)")
    median = statistics.median(ratios)
    print(f"median ratio (moonrl_items_per_s / bare_items_per_s) = {median:.3f}")
    if args.workers:
        rates = pipeline_rates(embedder, catalogue, args.workers, args.batch_size, args.repeats)
        base = statistics.median(rates[args.workers[0]])
        print(f"moon-rl embed loop ({len(catalogue.products)} products, images decoded in the loop, files written):")
        for w, found in rates.items():
            print(f"  num_workers={w}: median {statistics.median(found):8.1f} products/s "
                  f"({' '.join(f'{r:.1f}' for r in found)}), ratio to num_workers={args.workers[0]}: "
                  f"{statistics.median(found) / base:.3f}")
    return median


if __name__ == "__main__":
    main()
