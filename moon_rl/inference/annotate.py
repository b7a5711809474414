"""`moon-rl annotate`: write a copy of a catalogue whose products carry reasoning traces.

Two sources of traces (see `moon_rl.data.annotate` for the trace form and the copy on disk):

- `annotate_with_template`: deterministic traces from each product's category, attributes and title; instant, offline.
- `annotate_with_teacher`: a chat vision-language model (anything transformers' `AutoModelForImageTextToText` loads,
  the builtin tiny model included) is shown each product's images and text and asked for the trace. A trace that names
  a value the product's known attributes rule out is sampled again, up to `max_attempts` times, then dropped; the
  counts say how often. Products go in batches; each batch's results are written to a shard under `<out>/.annotate/`
  as soon as it finishes, so a rerun of the same command skips the finished products (a crash loses one batch).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from moon_rl.cache import atomic_write_text
from moon_rl.data.annotate import (
    catalogue_vocabulary,
    check_output_folder,
    contradicted,
    known_values,
    template_attribute_order,
    template_traces,
    write_catalogue_copy,
    write_catalogue_files,
)
from moon_rl.data.catalogue import Catalogue
from moon_rl.data.prompts import THINK_CLOSE, THINK_OPEN
from moon_rl.data.records import Product
from moon_rl.errors import DataError, MoonError
from moon_rl.logs import is_main_process
from moon_rl.modeling.inputs import product_text
from moon_rl.recipe.schema import ModelSpec

__all__ = ["AnnotationReport", "Teacher", "annotate_with_teacher", "annotate_with_template", "teacher_instruction"]

logger = logging.getLogger(__name__)

WORK_DIR = ".annotate"  # inside the output folder: the teacher's finished batches, for resuming
_THINK = re.compile(re.escape(THINK_OPEN) + r"(.*?)" + re.escape(THINK_CLOSE), re.DOTALL)


@dataclass
class AnnotationReport:
    """What an annotation run did (also written to the copy's `catalogue.json` under `annotation`)."""

    mode: str
    out: Path
    products: int
    annotated: int = 0  # products that got a new trace
    kept: int = 0  # products that had a trace and kept it
    no_values: int = 0  # template: nothing to write about (no category, attributes or title value)
    regenerated: int = 0  # teacher: products whose accepted trace was not the first one written
    dropped: int = 0  # teacher: no acceptable trace after every attempt
    pending: int = 0  # teacher with a limit: left for a later run
    resumed: int = 0  # teacher: products finished by an earlier run of the same command
    contradictions: dict[str, int] = field(default_factory=dict)  # teacher: rejected traces, by attribute

    def counts(self) -> dict[str, Any]:
        keys = ("annotated", "kept", "no_values", "regenerated", "dropped", "pending", "resumed", "contradictions")
        return {"mode": self.mode, "products": self.products, **{key: getattr(self, key) for key in keys}}

    def summary(self) -> str:
        parts = [f"{self.annotated} of {self.products} products annotated ({self.mode})"]
        parts += [f"{n} {what}" for n, what in (
            (self.kept, "kept their own trace"), (self.no_values, "had no category, attribute or title value"),
            (self.regenerated, "needed another attempt"), (self.dropped, "dropped (every attempt contradicted them)"),
            (self.resumed, "finished by an earlier run"), (self.pending, "left for later (--limit)")) if n]
        if self.contradictions:
            parts.append("contradicted: " + ", ".join(f"{k} {v}" for k, v in sorted(self.contradictions.items())))
        where = self.out.resolve()
        return "; ".join(parts) + f"\nwritten to {where}; train on it with --set data.catalogue={where}"


def annotate_with_template(catalogue: Catalogue, out: str | Path, *, retrace: bool = False,
                           order: list[str] | None = None, overwrite: bool = False) -> AnnotationReport:
    """Template traces (`moon_rl.data.annotate.template_traces`) written into a copy of `catalogue` at `out`."""
    made = template_traces(catalogue, retrace=retrace, order=order)
    report = AnnotationReport("template", Path(out), len(catalogue.products), annotated=len(made.traces),
                              kept=made.kept, no_values=made.empty)
    write_catalogue_copy(catalogue, out, command="annotate", traces=made.traces, overwrite=overwrite,
                         manifest_entry=("annotation", {**report.counts(), "order": made.order}))
    return report


# ---------------------------------------------------------------------------------------------------- teacher
def teacher_instruction(order: Sequence[str]) -> str:
    """What the teacher is asked: the catalogue's attributes, one `name value.` clause each (SFT's trace form)."""
    names = ", ".join(order) if order else "category, colour, pattern, material and brand"
    example = " ".join(f"{name} <value>." for name in (order or ["category", "colour"])[:3])
    return (f"Look at the product's images and text and describe its attributes: {names}. Write one short clause "
            f"per attribute, in this form: {example} Write only the clauses.")


def extract_trace(text: str) -> str:
    """The trace in a teacher's answer: the inside of its think block if it wrote one, tags and control characters
    removed, on one line."""
    if match := _THINK.search(text):
        text = match.group(1)
    text = text.replace(THINK_OPEN, " ").replace(THINK_CLOSE, " ")
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


class Teacher:
    """A chat VLM that writes traces (transformers generation, batched, left-padded).

    Args:
        name_or_path (`str`): a Hub id, a local folder, or a builtin model (`builtin:tiny-vl`).
        model_spec (`ModelSpec`): the recipe's model section: dtype, attention, pixel limits, quantization and
            `trust_remote_code` apply to the teacher too; its LoRA does not.
        max_images (`int`, *optional*, defaults to `4`): the most images of a product shown.
    """

    def __init__(self, name_or_path: str, model_spec: ModelSpec, *, max_images: int = 4):
        from moon_rl.modeling.loading import load_backbone

        spec = ModelSpec.model_validate({**model_spec.model_dump(), "name_or_path": name_or_path, "lora": None})
        self.name = name_or_path
        self.model, self.processor = load_backbone(spec)
        if torch.cuda.is_available() and spec.quantization is None:
            self.model.to("cuda")
        self.model.eval()
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
        self.max_images = max_images

    def write(self, products: Sequence[Product], images: Sequence[list[Image.Image]], instruction: str, *,
              max_new_tokens: int, do_sample: bool, temperature: float = 0.8) -> list[str]:
        """One answer per product (decoded, special tokens removed)."""
        texts = chat_prompts(self.processor, products, images, instruction, self.max_images)
        shown = [image for product_images in images for image in product_images[:self.max_images]]
        enc = self.processor(text=texts, images=shown or None, padding=True, return_tensors="pt")
        enc = {key: value.to(self.model.device) for key, value in enc.items()}
        sampling = {"do_sample": True, "temperature": temperature, "top_k": None, "top_p": None} if do_sample else {
            "do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def chat_prompts(processor: Any, products: Sequence[Product], images: Sequence[list[Image.Image]], instruction: str,
                 max_images: int) -> list[str]:
    """Each product's chat prompt for the teacher: its first `max_images` images, its text, the instruction."""
    texts = []
    for product, product_images in zip(products, images, strict=True):
        content: list[dict[str, Any]] = [{"type": "image"} for _ in product_images[:max_images]]
        content.append({"type": "text", "text": f"{product_text(product)}\n{instruction}"})
        messages = [{"role": "user", "content": content}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return texts


class VLLMTeacher:
    """The teacher on vLLM (GPU; `pip install 'moon-rl[vllm]'`): the same prompts and images as `Teacher`, vLLM's
    batching and paged attention for a catalogue of many thousand products.

    Args:
        name_or_path (`str`), model_spec (`ModelSpec`), max_images (`int`): as `Teacher`; the recipe's pixel limits
            reach vLLM's image processor, so it sees the images as transformers would.
        gpu_memory_utilization (`float`, *optional*, defaults to `0.85`): vLLM's share of the GPU.
        seed (`int`, *optional*, defaults to `0`): vLLM's sampling seed (regenerated traces are sampled).
    """

    def __init__(self, name_or_path: str, model_spec: ModelSpec, *, max_images: int = 4,
                 gpu_memory_utilization: float = 0.85, seed: int = 0):
        from moon_rl.modeling.generation import vllm_available
        from moon_rl.modeling.loading import load_processor, resolve_model_path

        if not vllm_available():
            raise MoonError("annotate: --teacher-backend vllm needs vllm, which is not installed; on a GPU machine: "
                            "pip install 'moon-rl[vllm]' (or use --teacher-backend hf)")
        from vllm import LLM  # noqa: PLC0415 - optional GPU dependency, imported only here

        spec = ModelSpec.model_validate({**model_spec.model_dump(), "name_or_path": name_or_path, "lora": None})
        path = resolve_model_path(spec)
        self.name = name_or_path
        self.max_images = max_images
        self.processor = load_processor(path, trust_remote_code=spec.trust_remote_code,
                                        min_pixels=spec.image_min_pixels, max_pixels=spec.image_max_pixels)
        self.llm = LLM(model=path, trust_remote_code=spec.trust_remote_code, seed=seed,
                       dtype="auto" if spec.dtype == "auto" else spec.dtype,
                       gpu_memory_utilization=gpu_memory_utilization, limit_mm_per_prompt={"image": max_images},
                       mm_processor_kwargs={"min_pixels": spec.image_min_pixels, "max_pixels": spec.image_max_pixels})

    def write(self, products: Sequence[Product], images: Sequence[list[Image.Image]], instruction: str, *,
              max_new_tokens: int, do_sample: bool, temperature: float = 0.8) -> list[str]:
        """One answer per product, as `Teacher.write` (greedy at temperature 0 unless `do_sample`)."""
        from vllm import SamplingParams  # noqa: PLC0415

        texts = chat_prompts(self.processor, products, images, instruction, self.max_images)
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0)
        requests = [{"prompt": text, **({"multi_modal_data": {"image": list(shown[:self.max_images])}} if shown else {})}
                    for text, shown in zip(texts, images, strict=True)]
        return [output.outputs[0].text for output in self.llm.generate(requests, params, use_tqdm=False)]


def make_teacher(name_or_path: str, model_spec: ModelSpec, backend: str = "auto", **kwargs: Any) -> Any:
    """`VLLMTeacher` or `Teacher`: `auto` takes vLLM when it is installed and a GPU is there, transformers otherwise."""
    from moon_rl.modeling.generation import vllm_available

    if backend not in ("auto", "hf", "vllm"):
        raise MoonError(f"annotate: --teacher-backend must be auto, hf or vllm, got {backend!r}")
    if backend == "vllm" or (backend == "auto" and vllm_available() and torch.cuda.is_available()):
        logger.info("annotate: the teacher generates with vLLM")
        return VLLMTeacher(name_or_path, model_spec, **kwargs)
    return Teacher(name_or_path, model_spec, **{k: v for k, v in kwargs.items() if k == "max_images"})


@dataclass
class _Work:
    """The teacher's finished products in `<out>/.annotate/` (one JSONL shard per batch) and the run they belong to."""

    folder: Path
    meta: dict[str, Any]

    def open(self, overwrite: bool) -> dict[str, dict[str, Any]]:
        """Finished products by id, from an earlier run of the same command; a different run's work is an error
        (or, with `overwrite`, discarded)."""
        meta_path = self.folder / "meta.json"
        if meta_path.is_file():
            earlier = json.loads(meta_path.read_text(encoding="utf-8"))
            if earlier != self.meta:
                if not overwrite:
                    changed = sorted(k for k in {*earlier, *self.meta} if earlier.get(k) != self.meta.get(k))
                    raise DataError(f"annotate: {self.folder.parent} holds an annotation made with other "
                                    f"settings ({', '.join(changed)} differ); rerun with the same settings to resume "
                                    "it, or pass --overwrite to start again")
                for shard in self.folder.glob("shard-*.jsonl"):
                    shard.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(meta_path, json.dumps(self.meta, indent=2) + "\n")
        done: dict[str, dict[str, Any]] = {}
        for shard in sorted(self.folder.glob("shard-*.jsonl")):
            for line in shard.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    done[row["id"]] = row
        return done

    def save(self, rows: list[dict[str, Any]]) -> None:
        index = len(list(self.folder.glob("shard-*.jsonl")))
        atomic_write_text(self.folder / f"shard-{index:06d}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _prepare_teacher_output(catalogue: Catalogue, out: Path, overwrite: bool, meta: dict[str, Any]) -> _Work:
    """The output folder of a teacher run: resumed when it holds a teacher run's work, refused when it is the source
    or an unrelated folder (replaced with `overwrite`)."""
    if out.resolve() == catalogue.base_dir.resolve() or not (out / WORK_DIR / "meta.json").is_file():
        check_output_folder(catalogue, out, overwrite)
        if out.exists():
            shutil.rmtree(out)
    return _Work(out / WORK_DIR, meta)


def annotate_with_teacher(
    catalogue: Catalogue, out: str | Path, teacher: Teacher, *, retrace: bool = False, order: list[str] | None = None,
    max_attempts: int = 3, batch_size: int = 8, max_new_tokens: int = 96, limit: int | None = None,
    overwrite: bool = False, seed: int = 0, show_progress: bool = True,
) -> AnnotationReport:
    """Traces written by `teacher` for the products without one (all with `retrace`), into a copy at `out`.

    Each product gets a greedy trace first; a trace that contradicts the product's known category or attributes (it
    names another value of the attribute and not the known one) is sampled again (temperature 0.8), up to
    `max_attempts` traces in all, then the product is dropped (it keeps no trace). `limit` annotates at most that many
    more products this run (a trial); rerunning the same command resumes where the last one stopped.
    """
    if max_attempts < 1:
        raise MoonError(f"annotate: --max-attempts must be at least 1, got {max_attempts}")
    out = Path(out).expanduser()
    products = list(catalogue.products.values())
    vocabulary = catalogue_vocabulary(products)
    order = order or template_attribute_order(products)
    instruction = teacher_instruction(order)
    meta = {"teacher": teacher.name, "source": str(catalogue.base_dir.resolve()), "instruction": instruction,
            "max_attempts": max_attempts, "max_new_tokens": max_new_tokens, "retrace": retrace, "seed": seed}
    work = _prepare_teacher_output(catalogue, out, overwrite, meta)
    done = work.open(overwrite)
    report = AnnotationReport("teacher", out, len(products), resumed=len(done))
    wanted = [p for p in products if retrace or not p.reasoning]
    report.kept = len(products) - len(wanted)
    todo = [p for p in wanted if p.id not in done]
    if limit is not None:
        report.pending = max(0, len(todo) - limit)
        todo = todo[:limit]
    torch.manual_seed(seed)
    bar = tqdm(total=len(todo), desc=f"annotate ({teacher.name})", unit="product",
               disable=not (show_progress and is_main_process()))
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        images = [[catalogue.image(p, i) for i in range(min(len(p.images), teacher.max_images))] for p in batch]
        work.save(_annotate_batch(teacher, batch, images, instruction, vocabulary, max_attempts, max_new_tokens, done))
        bar.update(len(batch))
    bar.close()
    traces: dict[str, str] = {}
    rejected: Counter[str] = Counter()
    for row in done.values():
        rejected.update(row.get("contradicted", []))
        if row.get("reasoning"):
            traces[row["id"]] = row["reasoning"]
            report.regenerated += row["attempts"] > 1
        else:
            report.dropped += 1
    report.annotated, report.contradictions = len(traces), dict(rejected)
    write_catalogue_files(catalogue, out, traces, manifest_entry=("annotation", report.counts()))
    return report


def _annotate_batch(teacher: Teacher, batch: list[Product], images: list[list[Image.Image]], instruction: str,
                    vocabulary: dict, max_attempts: int, max_new_tokens: int,
                    done: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Up to `max_attempts` traces per product until one does not contradict it; the batch's rows (also in `done`)."""
    rows = {p.id: {"id": p.id, "reasoning": None, "attempts": 0, "contradicted": []} for p in batch}
    pending = list(range(len(batch)))
    for attempt in range(max_attempts):
        answers = teacher.write([batch[i] for i in pending], [images[i] for i in pending], instruction,
                                max_new_tokens=max_new_tokens, do_sample=attempt > 0)
        still = []
        for i, answer in zip(pending, answers, strict=True):
            row, trace = rows[batch[i].id], extract_trace(answer)
            row["attempts"] += 1
            wrong = contradicted(trace, known_values(batch[i]), vocabulary) if trace else ["empty"]
            if wrong:
                row["contradicted"].extend(wrong)
                still.append(i)
            else:
                row["reasoning"] = trace
        pending = still
        if not pending:
            break
    done.update(rows)
    return list(rows.values())
