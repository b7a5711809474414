"""Hostile input, run as a user would: one-line error naming the place, exit 2, no traceback, nothing written.

moon-rl writes no log file of its own (it logs to stderr), so "nothing written except the log" means the run's output
folder is not created at all: each failing command must stop before `<output_dir>/sft` (or `grpo`, `embed`) exists.
The one exception is a reward function that raises or returns NaN: that costs the step its score, not the run.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moon_rl.cli import app
from tests.helpers import TINY_GRPO, tiny_recipe

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]

# Tiny everything: every failing command here must fail before the first training step, so only the one GRPO run
# that is meant to finish pays for training (2 steps of the tiny model on 48 products).
SFT = {"per_device_train_batch_size": 8, "max_steps": 1, "save_steps": 100}
GRPO = {**TINY_GRPO, "learning_rate": 1.0e-3, "save_steps": 100, "temperature": 1.0,
        "rewards": [{"name": "retrieval_rank"}]}
PROGRESS_BAR = re.compile(r"^embed \((direct|reason)\): +\d+%\|")


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "catalogue"
    result = invoke("data", "synth", str(out), "--n-products", "48", "--image-size", "56", "--seed", "0")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def broken(catalogue, tmp_path) -> Path:
    """A copy of the good catalogue, for one test to break."""
    return Path(shutil.copytree(catalogue, tmp_path / "broken"))


def write_recipe(tmp_path: Path, catalogue: Path, extra: str = "") -> Path:
    """`recipe.yaml` (tiny, output in `tmp_path/run`); with `extra`, `bad.yaml` extends it with those lines."""
    base = tmp_path / "recipe.yaml"
    base.write_text(tiny_recipe(tmp_path / "run", catalogue=catalogue, sft=SFT, grpo=GRPO,
                                eval={"faithfulness": False}))
    if not extra:
        return base
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: recipe.yaml\n{extra}")
    return bad


def product_line(catalogue: Path, index: int) -> tuple[int, dict]:
    """The 1-based line and the record of the `index`-th product of `products.jsonl`."""
    lines = (catalogue / "products.jsonl").read_text(encoding="utf-8").splitlines()
    return index + 1, json.loads(lines[index])


def assert_clean_failure(result, run_dir: Path, *names: str) -> str:
    """Exit 2, one `error: ...` line (naming each of `names`), no traceback, and no output folder."""
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output, output
    # `embed` may have drawn its progress bar (tqdm, on stderr) before it met the bad row, and a stage its warnings
    # (e.g. "starting from the recipe's base model"); nothing else may show.
    lines = [line for line in re.split(r"[\r\n]+", output)
             if line.strip() and not PROGRESS_BAR.search(line) and not line.startswith("WARNING moon_rl.")]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for name in names:
        assert name in lines[0], (name, lines[0])
    # moon-rl writes no log file: a run that fails on its input leaves no trace in its output folder.
    assert not run_dir.exists() or not any(run_dir.iterdir()), sorted(map(str, run_dir.rglob("*")))
    return lines[0]


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming `width` x `height` pixels, with a tiny (wrong-sized) image body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------------- images
def test_truncated_image_fails_sft_before_training(broken, tmp_path):
    line, product = product_line(broken, 5)
    image = broken / product["images"][0]
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    result = invoke("sft", str(write_recipe(tmp_path, broken)))
    message = assert_clean_failure(result, tmp_path / "run", f"products.jsonl:{line}", "images[0]", product["id"],
                                   product["images"][0])
    assert "truncated" in message
    assert str(broken) in message  # the folder too: the recipe may point anywhere
    validated = invoke("data", "validate", str(broken))
    assert validated.exit_code == 2 and f"products.jsonl:{line}: field 'images[0]'" in validated.output


def test_image_that_is_a_text_file_fails_embed_and_writes_no_index(broken, tmp_path):
    _, product = product_line(broken, 7)
    (broken / product["images"][0]).write_text("this is not a PNG, it is a text file\n")
    out = tmp_path / "run" / "embed"
    result = invoke("embed", str(write_recipe(tmp_path, broken)), "--out", str(out))
    message = assert_clean_failure(result, tmp_path / "run", product["id"], product["images"][0])
    assert "is not an image" in message and "--skip-bad" in message


def test_decompression_bomb_is_refused_from_its_header(broken, tmp_path):
    line, product = product_line(broken, 2)
    (broken / product["images"][0]).write_bytes(bomb_png(20000, 20000))
    result = invoke("grpo", str(write_recipe(tmp_path, broken)))
    message = assert_clean_failure(result, tmp_path / "run", f"products.jsonl:{line}", "images[0]", product["id"])
    assert "decompression-bomb" in message


# ---------------------------------------------------------------------------------------------------- rows
def test_empty_catalogue(broken, tmp_path):
    (broken / "products.jsonl").write_text("")
    result = invoke("sft", str(write_recipe(tmp_path, broken)))
    assert_clean_failure(result, tmp_path / "run", "products.jsonl", "no products")
    validated = invoke("data", "validate", str(broken))
    assert validated.exit_code == 2 and "catalogue has no products" in validated.output


def test_pair_pointing_at_a_missing_id(broken, tmp_path):
    pairs = broken / "pairs_train.jsonl"
    n_lines = len(pairs.read_text(encoding="utf-8").splitlines())
    with pairs.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"anchor": {"text": "a red shirt"}, "positive": "p9999"}) + "\n")
    result = invoke("sft", str(write_recipe(tmp_path, broken)))
    assert_clean_failure(result, tmp_path / "run", f"pairs_train.jsonl:{n_lines + 1}", "field 'positive'",
                         "unknown product id 'p9999'")


def test_non_utf8_catalogue_and_recipe(broken, tmp_path):
    line, product = product_line(broken, 3)
    path = broken / "products.jsonl"
    lines = path.read_bytes().split(b"\n")
    title = json.dumps(product["title"]).encode()
    lines[line - 1] = lines[line - 1].replace(title, title[:-1] + b"\xe9\"", 1)  # Latin-1 "é" ending the title
    path.write_bytes(b"\n".join(lines))
    result = invoke("sft", str(write_recipe(tmp_path, broken)))
    assert_clean_failure(result, tmp_path / "run", f"products.jsonl:{line}", "not valid UTF-8", "0xe9",
                         product["id"])

    recipe = write_recipe(tmp_path, broken, "# caf\xe9 recipe\n")
    recipe.write_bytes(recipe.read_text(encoding="utf-8").encode("latin-1"))
    for command in ("recipe validate", "sft"):
        result = invoke(*command.split(), str(recipe))
        assert_clean_failure(result, tmp_path / "run", f"{recipe}:2", "not valid UTF-8")


# ---------------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("section", ["sft", "grpo"])
def test_negative_batch_size(catalogue, tmp_path, section):
    recipe = write_recipe(tmp_path, catalogue, f"{section}:\n  per_device_train_batch_size: -8\n")
    for command in ("recipe validate", section):
        result = invoke(*command.split(), str(recipe))
        message = assert_clean_failure(result, tmp_path / "run", str(recipe), section,
                                       "`per_device_train_batch_size` must be an integer >= 1, got -8")
        assert "recipe.yaml" not in message  # blame the file that set the key, not its parent


def test_generation_batch_that_cannot_be_split(catalogue, tmp_path):
    recipe = write_recipe(tmp_path, catalogue, "grpo:\n  per_device_train_batch_size: 6\n  num_generations: 4\n")
    for command in ("recipe validate", "grpo"):
        result = invoke(*command.split(), str(recipe))
        assert_clean_failure(result, tmp_path / "run", "not divisible by grpo.num_generations (4)",
                             "per_device_train_batch_size (6)")


# ---------------------------------------------------------------------------------------------------- rewards
def test_reward_that_raises_or_returns_nan_costs_the_step_not_the_run(catalogue, tmp_path, caplog):
    (tmp_path / "my_rewards.py").write_text(
        "import math\n"
        "def boom(completions, **kwargs):\n"
        "    raise RuntimeError('reward service unavailable')\n"
        "def half_nan(completions, **kwargs):\n"
        "    values = [0.5, math.nan, math.inf, math.nan]\n"
        "    return [values[i % 4] for i in range(len(completions))]\n"
    )
    recipe = write_recipe(tmp_path, catalogue, "grpo:\n  rewards: [{name: 'my_rewards.py:boom'}, "
                          "{name: 'my_rewards.py:half_nan'}, {name: retrieval_rank}]\n")
    with caplog.at_level(logging.WARNING, logger="moon_rl.training.reward_context"):
        result = invoke("grpo", str(recipe))
    assert result.exit_code == 0, result.output
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reward '")]
    assert len(warned) == 2, warned  # once per failing reward, not once per step
    assert "reward 'boom' raised RuntimeError: reward service unavailable" in warned[0]
    assert "reward 'half_nan' returned NaN or inf for 6 of 8 completions" in warned[1]
    history = json.loads((tmp_path / "run" / "grpo" / "log_history.json").read_text())
    steps = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in steps] == [1, 2]
    for entry in steps:
        assert entry["rewards/boom/failures"] == 1.0
        assert entry["rewards/half_nan/failures"] == 0.75  # 3 of every 4 rows are NaN or inf
        assert entry["rewards/retrieval_rank/failures"] == 0.0
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["reward"])
        assert entry["rewards/half_nan/mean"] == 0.5  # the NaN / inf rows are left out, not averaged in
        assert entry["rewards/boom/mean"] is None  # TRL logs an all-NaN reward as None


def test_context_reward_contract():
    from moon_rl.training.reward_context import ContextReward

    logged: list[tuple[str, float]] = []

    def call(fn):
        reward = ContextReward(fn, dict, "r")
        return reward(["a", "b", "c"], log_metric=lambda name, value: logged.append((name, value)))

    assert call(lambda completions, **kw: [1, None, 2.5]) == [1.0, None, 2.5]  # a deliberate None is no failure
    assert call(lambda completions, **kw: [math.nan, 1.0, -math.inf]) == [None, 1.0, None]
    assert call(lambda completions, **kw: 1 / 0) == [None, None, None]
    assert call(lambda completions, **kw: [1.0]) == [None, None, None]  # wrong length: the output is unusable
    assert call(lambda completions, **kw: ["x", 1, 2]) == [None, None, None]
    assert logged == [("rewards/r/failures", v) for v in (0.0, 2 / 3, 1.0, 1.0, 1.0)]


def test_context_reward_passes_the_context_over_trl_keywords():
    from moon_rl.training.reward_context import ContextReward

    seen: list[dict] = []
    reward = ContextReward(lambda completions, **kw: seen.append(kw) or [1.0], lambda: {"truncated": [True]}, "r")
    assert reward(["a"], truncated=[False], colour=["red"]) == [1.0]
    assert seen == [{"truncated": [True], "colour": ["red"]}]
    assert reward.__name__ == "r"


def _flaky(outcomes: list[str]):
    """A reward that, call by call, succeeds ("ok"), raises ("raise") or returns an unusable output ("broken")."""
    calls = iter(outcomes)

    def fn(completions, **kwargs):
        outcome = next(calls)
        if outcome == "raise":
            raise ConnectionError("reward service unavailable")
        return [1.0] * len(completions) if outcome == "ok" else ["x"] * len(completions)

    return fn


def test_context_reward_stops_the_run_after_exactly_n_consecutive_failures():
    from moon_rl.training.reward_context import ContextReward

    n = 3
    # n - 1 failures, a success (resets the streak), n - 1 failures again: never n in a row, the run goes on.
    reward = ContextReward(_flaky(["raise", "broken", "ok", "raise", "raise", "raise"]), dict, "svc", n)
    for _ in range(2 * (n - 1) + 1):
        reward(["a", "b"])
    # The n-th consecutive failure stops it, naming the reward and chaining the reward's own exception.
    with pytest.raises(RuntimeError) as info:
        reward(["a", "b"])
    assert str(info.value) == (
        "reward 'svc' failed on every completion for 3 consecutive steps; "
        "last error: ConnectionError: reward service unavailable"
    )
    assert isinstance(info.value.__cause__, ConnectionError)
    # A broken output (not an exception of the reward's own) counts the same, and chains the contract error.
    broken = ContextReward(_flaky(["broken"] * n), dict, "svc", n)
    for _ in range(n - 1):
        assert broken(["a"]) == [None]
    with pytest.raises(RuntimeError, match="failed on every completion for 3 consecutive steps") as info:
        broken(["a"])
    assert isinstance(info.value.__cause__, ValueError)


def test_context_reward_nan_or_none_never_stops_the_run():
    from moon_rl.training.reward_context import ContextReward

    nan = ContextReward(lambda completions, **kw: [math.nan] * len(completions), dict, "nan", max_failure_steps=1)
    none = ContextReward(lambda completions, **kw: [None] * len(completions), dict, "none", max_failure_steps=1)
    for _ in range(10):
        assert nan(["a", "b"]) == [None, None]
        assert none(["a", "b"]) == [None, None]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, None])
def test_context_reward_rejects_a_bad_failure_limit(bad):
    from moon_rl.training.reward_context import ContextReward

    with pytest.raises(ValueError, match=re.escape(f"`max_failure_steps` must be a positive integer, got {bad!r}.")):
        ContextReward(lambda completions, **kw: [], dict, "r", bad)


# ---------------------------------------------------------------------------------------------------- --debug
def test_debug_shows_the_traceback(broken, tmp_path):
    """In a real process: the one-line error by default, Python's traceback with --debug."""
    (broken / "products.jsonl").write_text("")
    recipe = write_recipe(tmp_path, broken)
    cli = [sys.executable, str(ROOT / "cli.py")]
    plain = subprocess.run([*cli, "sft", str(recipe)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert plain.returncode == 2, plain.stderr
    assert "Traceback" not in plain.stderr and "catalogue has no products" in plain.stderr
    debug = subprocess.run([*cli, "--debug", "sft", str(recipe)], capture_output=True, text=True, cwd=tmp_path,
                           timeout=300)
    assert debug.returncode == 1, debug.stderr
    assert "Traceback (most recent call last)" in debug.stderr
    assert re.search(r"moon_rl\.errors\.DataError: .*products\.jsonl: catalogue has no products", debug.stderr)
    assert not (tmp_path / "run").exists()
