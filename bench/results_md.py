"""Sections of a shared results file: each bench owns the text between its own markers and leaves the rest alone.

Several benches report into `bench/RESULTS.md`. A bench writes its section as

    <!-- BEGIN name -->
    ...
    <!-- END name -->

replacing that section when the markers exist and appending it otherwise, so that rerunning one bench neither
duplicates its text nor erases another bench's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ANY_SECTION = re.compile(r"<!-- BEGIN (\S+) -->.*?<!-- END \1 -->", re.S)


def markers(name: str) -> tuple[str, str]:
    """The opening and closing marker lines of section `name`."""
    return f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"


def section_block(name: str, content: str) -> str:
    """`content` between the markers of `name` (surrounding blank lines trimmed so rewrites are idempotent)."""
    begin, end = markers(name)
    return f"{begin}\n{content.strip(chr(10))}\n{end}"


def replace_section(text: str, name: str, content: str, *, adopt_unmarked: bool = False) -> str:
    """`text` with section `name` set to `content`; every byte outside that section is kept.

    Args:
        text (`str`): the current file content ("" for a new file).
        name (`str`): the section's name, as in its markers.
        content (`str`): the section's new markdown.
        adopt_unmarked (`bool`, *optional*, defaults to `False`): when `text` has no markers for `name`, treat all of
            its text outside other sections as this section's old content (replaced, and put first) instead of
            appending. For a bench that used to own the whole file and now shares it.

    Raises:
        `ValueError`: `text` has the opening marker of `name` without its closing marker after it (or the reverse):
            guessing where the section ends could delete someone else's text.
    """
    begin, end = markers(name)
    block = section_block(name, content)
    start = text.find(begin)
    stop = text.find(end, start + len(begin)) if start >= 0 else -1
    if start >= 0 and stop >= 0:
        return text[:start] + block + text[stop + len(end):]
    if start >= 0 or end in text:
        raise ValueError(f"section {name!r} has unbalanced markers {begin!r} / {end!r}; fix the file by hand")
    if adopt_unmarked:
        others = [match.group(0) for match in _ANY_SECTION.finditer(text)]
        return "\n\n".join([block, *others]) + "\n"
    return (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"


def write_section(path: Path, name: str, content: str, *, adopt_unmarked: bool = False) -> Path:
    """Replace (or add) section `name` of the file at `path`, creating the file and its folder when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    path.write_text(replace_section(old, name, content, adopt_unmarked=adopt_unmarked), encoding="utf-8")
    return path


def machine_description() -> str:
    """One line naming the machine and the software versions a bench ran on: wall times mean nothing without it."""
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


#: The results file benches write their sections into (a quick smoke run writes beside its outputs instead).
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


#: Where the benches keep their runs (`<RUNS>/<bench name>` unless `--out` says otherwise).
RUNS = Path(__file__).resolve().parents[1] / "runs"


def seeded_parser(doc: str, name: str, *, seeds: list[int] | None = None,
                  seeds_help: str = "default: 0 1 2 (quick: 0)") -> argparse.ArgumentParser:
    """The arguments every `run_seeds` bench takes: `--seeds`, `--quick`, `--report-only` (from
    `<out>/<name>.json`), `--out` (default `runs/<name>`) and `--results`. The bench adds its own, then returns
    `seeds_and_results(parser.parse_args(argv))`. `doc`: the bench's module docstring (its first paragraph is the
    description)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds, help=seeds_help)
    parser.add_argument("--quick", action="store_true", help="seed 0 only; results default to <out>/RESULTS.md")
    parser.add_argument("--report-only", action="store_true",
                        help=f"rewrite the section from <out>/{name}.json without training")
    parser.add_argument("--out", type=Path, default=RUNS / name)
    parser.add_argument("--results", type=Path, default=None)
    return parser


def seeds_and_results(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the defaults every seeded bench shares: seeds 0 1 2 (seed 0 with `--quick`), and the results file:
    `--results`, else `<out>/RESULTS.md` for a quick run, else bench/RESULTS.md."""
    if hasattr(args, "seeds"):
        args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.results = args.results or (args.out / "RESULTS.md" if args.quick else RESULTS)
    return args


def run_seeds(args: argparse.Namespace, json_name: str, section_name: str,
              run_seed: Callable[[argparse.Namespace, int], dict[str, Any]],
              section: Callable[[argparse.Namespace, list[dict[str, Any]], float], str]) -> None:
    """Run `run_seed` for each of `args.seeds`, keeping every finished seed in `<out>/<json_name>` (a crash loses one
    seed), then write the results file's section; with `args.report_only`, rewrite the section from that file."""
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / json_name
    if args.report_only:
        write_section(args.results, section_name, section(args, json.loads(saved.read_text()), float("nan")))
        print(f"rewrote section {section_name!r} of {args.results}")
        return
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        runs.append(run_seed(args, seed))
        saved.write_text(json.dumps(runs, indent=2))
        print(json.dumps(runs[-1]), flush=True)
    write_section(args.results, section_name, section(args, runs, (time.perf_counter() - started) / 60))
    print(f"wrote section {section_name!r} of {args.results}")
