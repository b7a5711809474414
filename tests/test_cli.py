"""Every verb `moon-rl --help` lists, run as a user would (typer CliRunner, real files)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moon_rl.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny-cpu.yaml")


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "catalogue"
    result = invoke("data", "synth", str(out), "--n-products", "200", "--seed", "0")
    assert result.exit_code == 0, result.output
    return out


def test_help_lists_existing_verbs():
    result = invoke("--help")
    assert result.exit_code == 0
    for verb in ("data", "recipe", "annotate", "sft", "grpo", "embed", "search", "serve", "export"):
        assert re.search(rf"│ {verb}\b", result.output), verb
    for group, subs in {"data": ("synth", "validate"), "recipe": ("validate", "show"),
                        "export": ("sentence-transformers",)}.items():
        out = invoke(group, "--help").output
        for sub in subs:
            assert sub in out


def test_set_help_shows_its_list_example_whole():
    # Rich reads `[data,sft]` as markup and drops it unless escaped.
    result = runner.invoke(app, ["sft", "--help"], env={"COLUMNS": "240"}, catch_exceptions=False)
    assert "--set stages=[data,sft]" in result.output


@pytest.mark.parametrize("launch", ["console script", "-m moon_rl.cli", "cli.py"])
def test_every_way_to_launch_the_cli_reaches_it(launch, tmp_path):
    # The installed CLI is `moon_rl.cli` (console script, `accelerate launch -m moon_rl.cli`); the checkout's `cli.py`
    # runs the same app. From another folder, so that nothing is found through the checkout being the current one.
    if launch == "console script":
        script = Path(sys.executable).with_name("moon-rl")
        if not script.is_file():
            pytest.skip(f"no console script beside {sys.executable} (moon-rl not installed into this environment)")
        command = [str(script)]
    else:
        command = [sys.executable, *(["-m", "moon_rl.cli"] if launch.startswith("-m") else [str(ROOT / "cli.py")])]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage: moon-rl " in result.stdout and "recipe validate" in result.stdout


def test_synth_is_byte_identical_and_prints_the_text_ceiling(catalogue, tmp_path):
    result = invoke("data", "synth", str(tmp_path / "again"), "--n-products", "200", "--seed", "0")
    assert result.exit_code == 0
    assert "text-only ceiling" in result.output
    assert tree_digest(catalogue) == tree_digest(tmp_path / "again")
    other = invoke("data", "synth", str(tmp_path / "other"), "--n-products", "200", "--seed", "1")
    assert other.exit_code == 0
    assert tree_digest(catalogue) != tree_digest(tmp_path / "other")


def test_synth_replaces_a_catalogue_but_never_other_files_unless_told(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    refused = invoke("data", "synth", str(out), "--n-products", "16")
    assert refused.exit_code == 2 and "not a synthetic catalogue" in refused.output and "--overwrite" in refused.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert invoke("data", "synth", str(out), "--n-products", "16", "--overwrite").exit_code == 0
    assert not (out / "notes.txt").exists() and (out / "catalogue.json").is_file()
    again = invoke("data", "synth", str(out), "--n-products", "16", "--seed", "1")  # a catalogue: replaced
    assert again.exit_code == 0 and (out / "catalogue.json").is_file()
    assert invoke("data", "synth", str(tmp_path / "empty"), "--n-products", "16").exit_code == 0
    no_test = invoke("data", "synth", str(tmp_path / "train-only"), "--n-products", "16", "--test-fraction", "0")
    assert no_test.exit_code == 0 and "no test split" in no_test.output and "chance" not in no_test.output


def test_validate_passes_then_names_every_planted_problem(catalogue, tmp_path):
    assert invoke("data", "validate", str(catalogue)).exit_code == 0
    broken = tmp_path / "broken"
    shutil.copytree(catalogue, broken)
    (broken / "images" / "p0010_v0.png").unlink()
    lines = (broken / "products.jsonl").read_text().splitlines()
    lines[20] = '{"id": "p0020", "title": '  # malformed JSON on line 21
    lines.append(lines[30])  # duplicate id, after the products and their duplicate listings
    (broken / "products.jsonl").write_text("\n".join(lines) + "\n")
    result = invoke("data", "validate", str(broken))
    assert result.exit_code == 2
    out = result.output
    assert "products.jsonl:11: field 'images[0]': image file 'images/p0010_v0.png' not found (id p0010)" in out
    assert "products.jsonl:21: malformed JSON" in out
    duplicate = rf"products\.jsonl:{len(lines)}: field 'id': duplicate product id 'p0030' \(first defined on line 31\)"
    assert re.search(duplicate, out)


def test_recipe_validate_and_show():
    result = invoke("recipe", "validate", TINY)
    assert result.exit_code == 0 and "ok" in result.output
    shown = invoke("recipe", "show", TINY, "--set", "sft.learning_rate=1e-4", "--set", "model.heads.embed_dim=32")
    assert shown.exit_code == 0
    assert re.search(r"learning_rate: 0\.0001\b", shown.output)
    assert re.search(r"embed_dim: 32\b", shown.output)


def test_recipe_misspelt_key_suggests_the_right_one(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {TINY}\nsft:\n  learnig_rate: 1.0e-4\n")
    result = invoke("recipe", "validate", str(bad))
    assert result.exit_code == 2
    assert "unknown key 'sft.learnig_rate'" in result.output
    assert "did you mean 'sft.learning_rate'" in result.output
    assert str(bad) in result.output
    assert "Traceback" not in result.output


def test_embed_search_and_export_verbs(catalogue, tmp_path):
    out = tmp_path / "embed"
    result = invoke("embed", TINY, "--catalogue", str(catalogue), "--out", str(out),
                    "--set", f"output_dir={tmp_path / 'run'}")
    assert result.exit_code == 0, result.output
    assert {"embeddings.parquet", "index.faiss", "ids.json", "embed.json"} <= {p.name for p in out.iterdir()}
    assert "model: UNTRAINED" in result.output  # the run has no model yet
    found = invoke("search", str(out), "red striped cotton shirt", "-k", "5")
    assert found.exit_code == 0, found.output
    rows = [line for line in found.output.splitlines() if re.match(r"\s*\d+\s+p\d{4}(-dup)?\s+-?\d\.\d{4}", line)]
    assert len(rows) == 5, found.output
    missing = invoke("search", str(tmp_path / "nope"), "shirt")
    assert missing.exit_code == 2 and "Traceback" not in missing.output

    from moon_rl.modeling.embedder import MoonEmbedder
    from moon_rl.recipe import load_recipe

    model_dir = MoonEmbedder.from_recipe(load_recipe(TINY)).save(tmp_path / "model")
    exported = invoke("export", "sentence-transformers", str(model_dir), str(tmp_path / "st"))
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "st" / "modules.json").is_file()
    bad = invoke("export", "sentence-transformers", str(tmp_path / "embed"), str(tmp_path / "st2"))
    assert bad.exit_code == 2 and "moon_rl.json" in bad.output


def test_embed_defaults_to_the_runs_newest_model_and_run_redoes_an_index_of_another(catalogue, tmp_path):
    from moon_rl.modeling.embedder import MoonEmbedder
    from moon_rl.recipe import load_recipe
    from moon_rl.run import stage_done

    run_dir = tmp_path / "run"
    recipe = load_recipe(TINY, [f"output_dir={run_dir}", f"data.catalogue={catalogue}"])
    sft = MoonEmbedder.from_recipe(recipe).save(run_dir / "sft" / "final")
    result = invoke("embed", TINY, "--set", f"output_dir={run_dir}", "--set", f"data.catalogue={catalogue}")
    assert result.exit_code == 0, result.output
    assert "UNTRAINED" not in result.output
    manifest = json.loads((run_dir / "embed" / "embed.json").read_text())
    assert manifest["model"]["dir"] == str(sft.resolve()) and manifest["model"]["trained"] is True
    assert stage_done(recipe, "embed") == run_dir / "embed" / "embed.json"
    # GRPO finishes after the index was made: the run's embed stage is no longer done.
    MoonEmbedder.from_recipe(recipe).save(run_dir / "grpo" / "final")
    assert stage_done(recipe, "embed") is None


def test_mine_writes_a_copy_with_mined_negatives(catalogue, tmp_path):
    """`moon-rl mine` end to end with an (untrained) saved model: every training pair gets k negatives that are
    neither its positive nor its product anchor, and the summary reports the filters."""
    from moon_rl.data.catalogue import load_catalogue
    from moon_rl.modeling.embedder import MoonEmbedder
    from moon_rl.recipe import load_recipe

    model_dir = MoonEmbedder.from_recipe(load_recipe(TINY)).save(tmp_path / "model")
    out = tmp_path / "mined"
    # --margin 0: the untrained model scores every product alike, so the near-twin filter would take most of them
    result = invoke("mine", TINY, "--model", str(model_dir), "--k", "3", "--margin", "0", "--out", str(out),
                    "--set", f"data.catalogue={catalogue}", "--set", f"output_dir={tmp_path / 'run'}")
    assert result.exit_code == 0, result.output
    assert re.search(r"negatives mined for \d+ 'train' pairs \(k=3, margin=None\); candidates removed: anchor \d+, "
                     r"positive \d+, duplicate \d+, too_close \d+", result.output), result.output
    mined, source = load_catalogue(out), load_catalogue(catalogue)
    assert len(mined.pairs["train"]) == len(source.pairs["train"])
    assert [(p.positive, p.negatives) for p in mined.pairs["test"]] == [(p.positive, p.negatives)
                                                                     for p in source.pairs["test"]]
    from moon_rl.inference.mine import held_out_products

    held_out = held_out_products(source, "train")
    assert held_out and f"{len(held_out)} products of other splits only were never candidates" in result.output
    for pair in mined.pairs["train"]:
        assert len(pair.negatives) == 3 and pair.positive not in pair.negatives and pair.anchor not in pair.negatives
        assert not held_out & set(pair.negatives)  # no test product becomes a training negative
