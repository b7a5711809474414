"""`moon-rl` command line (also `python -m moon_rl.cli`, `accelerate launch -m moon_rl.cli`): parse, load the recipe,
call one library function. The top layer: nothing else in moon_rl imports it. Errors a user can cause (`MoonError`:
bad recipe, bad catalogue row, bad argument) print one line and exit with code 2; `moon-rl --debug` shows the traceback.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

if TYPE_CHECKING:
    from moon_rl.recipe import Recipe  # imported by the commands that load one, so that `--help` stays fast

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers 5.23 deprecates `gradient_checkpointing`, which TRL's configs set by default: not the user's to act on.
warnings.filterwarnings("ignore", message=".*`gradient_checkpointing` is deprecated", category=FutureWarning)

app = typer.Typer(
    name="moon-rl",
    help="Reasoning-aware product embeddings: SFT + GRPO post-training of vision-language models on TRL.\n\n"
    "Examples:\n\n"
    "  moon-rl data synth runs/catalogue --n-products 200 --seed 0\n\n"
    "  moon-rl run recipes/tiny-cpu.yaml\n\n"
    "  moon-rl recipe validate recipes/tiny-cpu.yaml\n\n"
    "  moon-rl recipe validate recipes/qwen2.5-vl-3b.yaml --dry-run\n\n"
    "  moon-rl plan recipes/qwen2.5-vl-3b.yaml --gpus 2\n\n"
    "  moon-rl sft recipes/tiny-cpu.yaml\n\n"
    "  moon-rl grpo recipes/tiny-cpu.yaml\n\n"
    "  moon-rl eval recipes/tiny-cpu.yaml\n\n"
    "  moon-rl embed recipes/tiny-cpu.yaml --catalogue runs/catalogue --out runs/embed\n\n"
    "  moon-rl search runs/embed \"red striped shirt\" -k 5\n\n"
    "  moon-rl serve runs/embed --port 8000",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Catalogues: make a synthetic one, validate yours.", no_args_is_help=True)
recipe_app = typer.Typer(help="Recipes: validate and show the resolved recipe.", no_args_is_help=True)
export_app = typer.Typer(help="Export a trained model to other toolkits.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(recipe_app, name="recipe")
app.add_typer(export_app, name="export")

_state = {"debug": False}
F = TypeVar("F", bound=Callable[..., Any])

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, typed: --set sft.learning_rate=1e-4 --set stages=\\[data,sft]"),
]
RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", exists=True, dir_okay=False)]
ResumeOption = Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")]
RetrainOption = Annotated[bool, typer.Option("--overwrite", help="Train again into a finished run's folder.")]


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also log moon-rl's debug lines.")] = False,
) -> None:
    from moon_rl.logs import setup_logging

    _state["debug"] = debug
    setup_logging(verbose=verbose or debug)
    atexit.register(_close_process_group)


def _close_process_group() -> None:
    """Under torchrun / accelerate launch: close the process group before the interpreter exits, as accelerate's
    `end_training` does (not per stage: `moon-rl run` trains several stages in one process)."""
    dist = sys.modules.get("torch.distributed")  # never imported just for this (a `--help` stays fast)
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _user_errors(fn: F) -> F:
    """Print a `MoonError` as one line and exit 2 (traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from moon_rl.errors import MoonError

        try:
            return fn(*args, **kwargs)
        except MoonError as exc:
            if _state["debug"]:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _result(text: str) -> None:
    """A training or evaluation command's result, on stdout, once: under torchrun / accelerate launch every process
    runs the command, and only the main one reports."""
    from moon_rl.logs import is_main_process

    if is_main_process():
        typer.echo(text)


def _copy_hint(recipe: Recipe) -> str:
    """What else training on a written catalogue copy needs: the copy has moon-rl's column and split names."""
    if not (recipe.data.columns or recipe.data.splits):
        return ""
    return " --set 'data.columns={}' --set 'data.splits={}' (the copy uses moon-rl's column and split names)"


def _load(recipe: Path, overrides: list[str] | None) -> Recipe:
    from moon_rl.recipe import load_recipe

    return load_recipe(recipe, overrides or [])


# ---------------------------------------------------------------------------------------------------- data
@data_app.command("synth")
@_user_errors
def data_synth(
    out: Annotated[Path, typer.Argument(help="Folder to write into (a catalogue there is replaced; else --overwrite).")],
    n_products: Annotated[int, typer.Option(help="Products, look-alikes included (whole families).", min=8)] = 600,
    seed: Annotated[int, typer.Option(help="Same seed, byte-identical output.")] = 0,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.", min=28)] = 112,
    test_fraction: Annotated[float, typer.Option(help="Share of product families held out for test.")] = 0.2,
    lookalikes: Annotated[int, typer.Option(help="Look-alikes per product (family size - 1).", min=0)] = 3,
    trace_errors: Annotated[float, typer.Option(
        help="Share of training products whose trace names one wrong colour (a teacher's errors).", min=0.0, max=1.0,
    )] = 0.0,
    validation: Annotated[bool, typer.Option(
        "--validation", help="Leave the test families out; training families take their place as the held-out split "
        "(to choose settings without the test split).")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace OUT even when it holds something other than a synthetic catalogue.")] = False,
) -> None:
    """Write the deterministic synthetic catalogue (products, images, pairs, hard test gallery)."""
    from moon_rl.data.synthetic import SyntheticConfig, synthesize

    options = SyntheticConfig(n_products=n_products, seed=seed, image_size=image_size, test_fraction=test_fraction,
                              lookalikes=lookalikes, trace_errors=trace_errors, validation=validation)
    report = synthesize(out, options, overwrite=overwrite)
    typer.echo(report.summary())


@data_app.command("validate")
@_user_errors
def data_validate(
    path: Annotated[str, typer.Argument(
        help="Catalogue folder or products file, a folder `datasets` reads, or a Hub dataset hf:owner/name[:config]"
             "[@revision].")],
    column: Annotated[list[str] | None, typer.Option(
        "--column", help="Map a moon-rl field to your column, as data.columns does: --column id=sku "
        "--column image=img --column query_text=query")] = None,
    split: Annotated[list[str] | None, typer.Option(
        "--split", help="Read only these splits, renamed, as data.splits does: --split train=training "
        "--split test=validation")] = None,
) -> None:
    """Check every row of a catalogue and its pairs; print each problem with file, line, field and reason."""
    from moon_rl.data.columns import column_map_problems, parse_name_pairs
    from moon_rl.data.validate import validate_catalogue
    from moon_rl.errors import MoonError

    columns, splits = parse_name_pairs(column, "--column"), parse_name_pairs(split, "--split")
    if problems := column_map_problems(columns):
        raise MoonError(f"--column: {'; '.join(problems)}")
    report = validate_catalogue(path, columns=columns, splits=splits)
    for problem in report.problems:
        typer.echo(str(problem), err=True)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(2)


# ---------------------------------------------------------------------------------------------------- recipe
@recipe_app.command("validate")
@_user_errors
def recipe_validate(
    recipe: RecipeArg,
    set_: SetOption = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Validate for the target GPU machine from any machine: build the TRL configs as there, load "
        "nothing; a missing catalogue path or optional package (vllm, bitsandbytes) is a note, not an error.")] = False,
) -> None:
    """Resolve the recipe (extends, --set), check every key and build the TRL configs; exit 2 on any problem."""
    resolved = _load(recipe, set_)
    problems, notes = resolved.dry_run() if dry_run else (resolved.check(), [])
    for note in notes:
        typer.echo(f"note: {note}")
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    if problems:
        raise typer.Exit(2)
    typer.echo(f"{recipe}: ok" + (" (dry run: TRL configs built as on the target GPU, no weights loaded)" if dry_run
                                  else ""))


@recipe_app.command("show")
@_user_errors
def recipe_show(recipe: RecipeArg, set_: SetOption = None) -> None:
    """Print the resolved recipe (extends and --set applied, defaults filled in)."""
    typer.echo(_load(recipe, set_).to_yaml(), nl=False)


@app.command("plan")
@_user_errors
def plan(
    recipe: RecipeArg,
    set_: SetOption = None,
    gpus: Annotated[int, typer.Option(help="GPUs (processes) the run uses.", min=1)] = 1,
    strategy: Annotated[str, typer.Option(
        help="ddp, zero2, zero3 or fsdp (recipes/accelerate/<x>.yaml): what is sharded across --gpus.")] = "ddp",
    gpu_memory: Annotated[float, typer.Option(
        "--gpu-memory", help="Memory of one GPU in GiB (vLLM colocate takes a share of it).", min=1)] = 80.0,
    prompt_tokens: Annotated[int, typer.Option(
        help="Text tokens of a prompt (instruction, title, description), image tokens excluded.", min=1)] = 128,
) -> None:
    """Estimate GPU memory per device (GiB) of each training stage, without loading or downloading weights."""
    from moon_rl.plan import format_plan, plan_recipe

    resolved = _load(recipe, set_)
    arch, plans = plan_recipe(resolved, gpus=gpus, strategy=strategy, gpu_memory_gib=gpu_memory,
                              prompt_tokens=prompt_tokens)
    typer.echo(format_plan(resolved, arch, plans, gpus=gpus, strategy=strategy, gpu_memory_gib=gpu_memory))


@app.command("annotate")
@_user_errors
def annotate(
    recipe: RecipeArg,
    template: Annotated[bool, typer.Option(
        "--template", help="Traces from each product's category, attributes and title: offline and instant.")] = False,
    teacher: Annotated[str | None, typer.Option(
        help="A chat vision-language model (Hub id or folder; builtin:tiny-vl for a smoke test) writes the traces.",
    )] = None,
    out: Annotated[Path | None, typer.Option(
        help="Folder of the annotated copy (default: <output_dir>/catalogue-annotated).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
    retrace: Annotated[bool, typer.Option(
        "--retrace", help="Annotate products that already have a trace too (default: keep theirs).")] = False,
    attributes: Annotated[str | None, typer.Option(
        help="Attributes the traces name, in order, comma-separated (default: category, then the most common).",
    )] = None,
    limit: Annotated[int | None, typer.Option(
        help="Teacher: annotate at most this many products now (a trial); rerun to resume.", min=1)] = None,
    max_attempts: Annotated[int, typer.Option(
        help="Teacher: traces written per product until one does not contradict its known attributes.", min=1)] = 3,
    batch_size: Annotated[int, typer.Option(help="Teacher: products per generation batch.", min=1)] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Teacher: longest trace, in tokens.", min=1)] = 96,
    teacher_backend: Annotated[str, typer.Option(
        help="Teacher: auto (vLLM when installed and a GPU is there, else transformers), hf or vllm.")] = "auto",
    set_: SetOption = None,
) -> None:
    """Write a copy of the recipe's catalogue whose products carry reasoning traces (the source is never modified)."""
    from moon_rl.data.catalogue import load_recipe_catalogue
    from moon_rl.errors import MoonError
    from moon_rl.inference.annotate import annotate_with_teacher, annotate_with_template, make_teacher

    if template == (teacher is not None):
        raise MoonError("annotate: give exactly one of --template (traces from the products' attributes) or "
                        "--teacher MODEL (a vision-language model writes them)")
    resolved = _load(recipe, set_)
    catalogue = load_recipe_catalogue(resolved.data)
    order = [name.strip() for name in attributes.split(",") if name.strip()] if attributes else None
    target = out or Path(resolved.output_dir) / "catalogue-annotated"
    if template:
        report = annotate_with_template(catalogue, target, retrace=retrace, order=order, overwrite=overwrite)
    else:
        report = annotate_with_teacher(
            catalogue, target, make_teacher(teacher, resolved.model, teacher_backend, seed=resolved.seed),
            retrace=retrace, order=order,
            max_attempts=max_attempts, batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit,
            overwrite=overwrite, seed=resolved.seed)
    _result(report.summary() + _copy_hint(resolved))


@app.command("mine")
@_user_errors
def mine(
    recipe: RecipeArg,
    model: Annotated[Path, typer.Option(help="A trained model folder (e.g. <output_dir>/sft/final).",
                                        exists=True, file_okay=False)],
    k: Annotated[int, typer.Option("--k", help="Negatives per pair.", min=1)] = 4,
    margin: Annotated[float, typer.Option(
        help="Skip candidates scoring above this fraction of the positive's score (likely unlabelled positives); "
             "0 turns the filter off.", min=0.0)] = 0.95,
    split: Annotated[str, typer.Option(help="The split whose pairs get negatives.")] = "train",
    mode: Annotated[str, typer.Option(help="How products are embedded: direct or reason (slower).")] = "direct",
    keep_given: Annotated[bool, typer.Option("--keep-given", help="Keep the pairs' given negatives first.")] = False,
    out: Annotated[Path | None, typer.Option(
        help="Folder of the mined copy (default: <output_dir>/catalogue-mined).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
    set_: SetOption = None,
) -> None:
    """Mine hard negatives for a split's pairs with a trained model, false negatives filtered; write a copy."""
    from moon_rl.data.catalogue import load_recipe_catalogue
    from moon_rl.errors import MoonError
    from moon_rl.inference.mine import mine_negatives, write_mined_catalogue
    from moon_rl.modeling.embedder import MoonEmbedder

    if mode not in ("direct", "reason"):
        raise MoonError(f"mine: --mode must be direct or reason, got {mode!r}")
    resolved = _load(recipe, set_)
    catalogue = load_recipe_catalogue(resolved.data)
    report = mine_negatives(MoonEmbedder.load(model), catalogue, split, k=k, margin=margin or None, mode=mode,
                            batch_size=resolved.eval.batch_size)
    target = write_mined_catalogue(catalogue, report, out or Path(resolved.output_dir) / "catalogue-mined",
                                   keep_given=keep_given, model=str(model), overwrite=overwrite)
    _result(f"{report.summary()}\nwritten to {target.resolve()}; train on it with "
            f"--set data.catalogue={target.resolve()}{_copy_hint(resolved)}")


# ---------------------------------------------------------------------------------------------------- train
@app.command("sft")
@_user_errors
def sft(
    recipe: RecipeArg, set_: SetOption = None, resume: ResumeOption = False, overwrite: RetrainOption = False,
) -> None:
    """Stage 1: reasoning SFT + InfoNCE. Writes <output_dir>/sft/final and metrics.json."""
    _train_stage("sft", _load(recipe, set_), resume, overwrite)


@app.command("grpo")
@_user_errors
def grpo(
    recipe: RecipeArg, set_: SetOption = None, resume: ResumeOption = False, overwrite: RetrainOption = False,
) -> None:
    """Stage 2: GRPO with retrieval rewards + InfoNCE, from the SFT model. Writes <output_dir>/grpo/final."""
    _train_stage("grpo", _load(recipe, set_), resume, overwrite)


def _train_stage(stage: str, recipe: Recipe, resume: bool, overwrite: bool) -> None:
    """Train a stage, then evaluate its model on the test split (metrics.json) and print the table once."""
    from moon_rl.evaluation.report import evaluate_stage, stage_table

    if stage == "sft":
        from moon_rl.training.sft import run_sft as train
    else:
        from moon_rl.training.grpo import run_grpo as train
    final = train(recipe, resume=resume, overwrite=overwrite)
    evaluate_stage(recipe, stage)
    _result(f"{stage_table(final.parent)}{stage.upper()} model: {final}\nmetrics: {final.parent / 'metrics.json'}")


# ---------------------------------------------------------------------------------------------------- eval / run
@app.command("eval")
@_user_errors
def eval_(
    recipe: RecipeArg,
    model: Annotated[list[Path] | None, typer.Option(
        "--model", help="Model folder to evaluate (repeatable; default: the run's finished sft/grpo models).")] = None,
    out: Annotated[Path | None, typer.Option(help="Report folder (default: <output_dir>/eval).")] = None,
    set_: SetOption = None,
) -> None:
    """Evaluate models and baselines on the test split: report.md, metrics.json and PNG plots."""
    from moon_rl.evaluation.report import finished_models, main_table, model_label, read_results, run_eval

    loaded = _load(recipe, set_)
    run_dir = Path(loaded.output_dir)
    models = finished_models(run_dir) if not model else {model_label(m): m for m in model}
    folder = run_eval(loaded, models, out, run_dir=run_dir)
    _result(f"{main_table(read_results(folder / 'metrics.json'))}\n\nreport: {folder / 'report.md'}")


@app.command("run")
@_user_errors
def run(
    recipe: RecipeArg,
    set_: SetOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo finished stages too.")] = False,
) -> None:
    """Run the recipe's stages in order (data, sft, grpo, embed, eval), skipping finished ones; print the report."""
    from moon_rl.evaluation.report import main_table, read_results
    from moon_rl.run import run_stages

    loaded = _load(recipe, set_)
    out = run_stages(loaded, overwrite=overwrite)
    metrics = out / "eval" / "metrics.json"
    if metrics.is_file():
        _result(f"\n{main_table(read_results(metrics))}\n\nreport: {out / 'eval' / 'report.md'}")


# ---------------------------------------------------------------------------------------------------- embed
@app.command("embed")
@_user_errors
def embed(
    recipe: RecipeArg,
    model: Annotated[Path | None, typer.Option("--model", help="Trained model folder (default: the run's newest "
                                               "finished model, grpo then sft; untrained when there is none).")] = None,
    catalogue: Annotated[str | None, typer.Option(help="Catalogue folder/file (default: the recipe's).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <output_dir>/embed).")] = None,
    mode: Annotated[str | None, typer.Option(help="direct (fast) or reason (generate first).")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip unreadable products instead of stopping.")] = False,
    dim: Annotated[int | None, typer.Option("--dim", min=1, help="Keep the first DIM values of each vector "
                                            "(a Matryoshka size; default: embed.dim, else the full size).")] = None,
    set_: SetOption = None,
) -> None:
    """Embed a catalogue into embeddings.parquet + a FAISS index."""
    from moon_rl.inference.pipeline import run_embed
    from moon_rl.run import latest_model

    loaded = _load(recipe, set_)
    model = model if model is not None else latest_model(loaded)  # as `run` and `eval`: the run's own model
    summary = run_embed(loaded, model_dir=model, catalogue=catalogue, out=out, mode=mode, skip_bad=skip_bad, dim=dim)
    _result(summary.summary())


@app.command("search")
@_user_errors
def search(
    index: Annotated[Path, typer.Argument(help="Folder written by `moon-rl embed`.")],
    query: Annotated[str | None, typer.Argument(help="Query text.")] = None,
    image: Annotated[Path | None, typer.Option(help="Query image.", exists=True, dir_okay=False)] = None,
    k: Annotated[int, typer.Option("-k", help="Number of results.", min=1)] = 5,
    nprobe: Annotated[int | None, typer.Option(help="IVF indexes: cells searched (default: the stored one).",
                                               min=1)] = None,
    ef_search: Annotated[int | None, typer.Option(help="HNSW indexes: search breadth (default: the stored one).",
                                                  min=1)] = None,
) -> None:
    """Print the k nearest products to a text and/or image query."""
    from moon_rl.errors import MoonError
    from moon_rl.inference.search import format_results
    from moon_rl.inference.search import search as run_search

    if query is None and image is None:
        raise MoonError("give a query text, an --image, or both")
    params = {name: value for name, value in (("nprobe", nprobe), ("efSearch", ef_search)) if value is not None}
    typer.echo(format_results(run_search(index, text=query, image=image, k=k, params=params)))


@app.command("serve")
@_user_errors
def serve(
    index: Annotated[Path, typer.Argument(help="Folder written by `moon-rl embed`.")],
    model: Annotated[Path | None, typer.Option("--model", help="Model folder (default: the one that built the index).")]
    = None,
    host: Annotated[str, typer.Option(help="Address to listen on; only this machine by default.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="MOON_RL_API_KEY",
                                                help="Require this key (X-API-Key header) on every API route.")] = None,
    catalogue: Annotated[str | None, typer.Option(help="Catalogue, if it moved since the index was built.")] = None,
    batching: Annotated[bool, typer.Option("--batching/--no-batching",
                                           help="Merge concurrent requests into one model forward.")] = True,
    max_batch: Annotated[int, typer.Option(help="Most records in one batched forward.", min=1)] = 16,
    max_wait_ms: Annotated[float, typer.Option(help="How long a forward waits for more requests (ms).", min=0)] = 5.0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads for the model (default: torch's choice).",
                                                min=1)] = None,
) -> None:
    """Serve an index over HTTP: POST /embed, POST /search, a search page at /."""
    from moon_rl.errors import MoonError

    try:
        import uvicorn

        from moon_rl.serve import create_app
    except ImportError as exc:
        raise MoonError(f"moon-rl serve needs the serve extra ({exc.name} is missing): "
                        'pip install "moon-rl[serve]"') from None
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logging.getLogger("moon_rl").warning(
            "serving on %s without an API key: anyone who can reach this port can use the service (--api-key)", host)
    if threads is not None:
        import torch

        # On a CPU shared with other work, fewer intra-op threads than cores avoids stalls at torch's thread barriers.
        torch.set_num_threads(threads)
    web_app = create_app(index, model_dir=model, api_key=api_key, batching=batching, max_batch=max_batch,
                         max_wait_ms=max_wait_ms, catalogue=catalogue)
    typer.echo(f"serving {index} on http://{host}:{port}/ (Ctrl-C stops)")
    uvicorn.run(web_app, host=host, port=port, log_level="info")


# ---------------------------------------------------------------------------------------------------- export
@export_app.command("sentence-transformers")
@_user_errors
def export_st(
    model_dir: Annotated[Path, typer.Argument(help="Trained moon-rl model folder.", exists=True, file_okay=False)],
    out: Annotated[Path, typer.Argument(help="Output folder.")],
) -> None:
    """Write a folder that SentenceTransformer(out, trust_remote_code=True) loads, without moon-rl installed."""
    from moon_rl.inference.st_export import export_sentence_transformers

    path = export_sentence_transformers(model_dir, out)
    typer.echo(f"wrote {path}; load with SentenceTransformer({str(path)!r}, trust_remote_code=True)")


def main() -> None:  # pragma: no cover - `python -m moon_rl.cli`, `python cli.py`
    app(prog_name="moon-rl")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
