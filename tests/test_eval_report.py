"""`moon-rl eval` / `moon-rl run`: zero-shot tasks, faithfulness, the report folder, the staged pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from moon_rl.data.records import Product
from moon_rl.evaluation.faithfulness import derangement, faithfulness
from moon_rl.evaluation.plots import stage_training_curves, training_curves, training_panels
from moon_rl.evaluation.report import faithfulness_table, main_table, read_results, write_report, zero_shot_table
from moon_rl.evaluation.result import EvaluationResult
from moon_rl.evaluation.zero_shot import macro_f1, zero_shot_tasks
from tests.helpers import TINY_GRPO, TINY_SFT, tiny_recipe


def _unit(*rows):
    x = np.asarray(rows, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_zero_shot_classification_and_attributes_on_known_vectors():
    products = [Product(id=f"p{i}", title="t", category=c, attributes={"colour": col})
                for i, (c, col) in enumerate([("shirt", "red"), ("shirt", "blue"), ("shoe", "red"), ("shoe", "red")])]
    prompts = {"shirt": [1, 0, 0], "shoe": [0, 1, 0], "colour: blue": [0, 0, 1], "colour: red": [1, 1, 0]}

    def encode(texts):
        return _unit(*[prompts[t] for t in texts])

    # p0 is a shirt, p1 looks like a shoe (wrong), p2/p3 shoes; colours: p1 blue right, others red-ish
    vecs = _unit([1, 0.2, 0.1], [0.1, 1, 0.9], [0.1, 1, 0], [0.2, 1, 0.1])
    space = {"category": ["shirt", "shoe"], "colour": ["blue", "red"]}
    out = zero_shot_tasks(products, vecs, space, encode)
    assert out["classification"]["accuracy"] == pytest.approx(0.75)
    # shirt: tp 1, fn 1 -> F1 2/3; shoe: tp 2, fp 1 -> F1 0.8
    assert out["classification"]["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert out["attributes"]["colour"] == pytest.approx(1.0) and out["attributes"]["mean"] == pytest.approx(1.0)
    assert macro_f1([0, 0, 1], [0, 0, 1], 3) == 1.0  # an absent class does not count


def test_derangement_moves_every_item():
    for n in (2, 3, 10, 57):
        target = derangement(n, seed=n)
        assert sorted(target) == list(range(n)) and all(target[i] != i for i in range(n))


class _FakeEmbedder:
    """Vectors = base vector of the record, plus (if `follows`) the completion's first id as a strong direction.
    Sampled chains: record r's is [r] on every call when r is even, [r + call] (a new chain each call) when r is odd."""

    def __init__(self, follows: bool):
        self.follows = follows
        self.sample_calls = 0

    def encode(self, records, mode="direct", completions=None, do_sample=False, return_completions=False, **kwargs):
        if completions is None and do_sample:
            completions = [[r] if r % 2 == 0 else [r + self.sample_calls] for r in records]
            self.sample_calls += 1
        out = []
        for i, r in enumerate(records):
            v = np.zeros(8)
            v[r % 8] = 1.0
            if self.follows and completions is not None:
                v[completions[i][0] % 8] += 3.0
            if do_sample:
                v += np.random.default_rng(i).normal(0, 0.01, 8)
            out.append(v / np.linalg.norm(v))
        out = np.asarray(out, np.float32)
        return (out, completions) if return_completions else out


@pytest.mark.parametrize("follows", [True, False])
def test_swapped_reasoning_moves_only_a_model_that_follows_it(follows):
    gallery = list(range(8))
    ids = [[i] for i in gallery]
    embedder = _FakeEmbedder(follows)
    greedy = embedder.encode(gallery, completions=ids)

    def recall(vecs):  # query i is the base vector of product i
        return {"text->product": float(np.mean(np.argmax(np.eye(8) @ vecs.T, axis=1) == np.arange(8)))}

    found = faithfulness(embedder, gallery, greedy, ids, embedder.encode(gallery), recall)
    assert found["reason"]["text->product"] == 1.0
    assert found["swapped"]["text->product"] == (0.0 if follows else 1.0)
    # Half the products sample the same chain twice; the other half's two chains differ, and only a model that follows
    # its chain embeds them apart (e_r + 3 e_r against e_r + 3 e_(r+1): cosine 4 / (4 sqrt(10)) = 0.32).
    assert found["chains_identical"] == 0.5
    assert found["chain_cosine_differing"] == pytest.approx(0.316 if follows else 1.0, abs=0.02)
    assert found["chain_cosine"] == pytest.approx((1.0 + found["chain_cosine_differing"]) / 2, abs=0.01)


def _history(stage):
    if stage == "sft":
        return [{"step": s, "loss": 5 - s / 10, "lm_loss": 2 - s / 20, "infonce/text_direct": 3 - s / 10,
                 "retrieval_acc/text_direct": s / 10} for s in range(1, 9)]
    return [{"step": s, "reward": 0.5 + s / 20, "rewards/retrieval_rank/mean": 0.4 + s / 20, "infonce": 1 - s / 20,
             "completions/mean_length": 30 - s} for s in range(1, 9)]


def test_report_folder_holds_tables_metrics_and_real_plots(tmp_path):
    run = tmp_path / "run"
    for stage in ("sft", "grpo"):
        (run / stage).mkdir(parents=True)
        (run / stage / "log_history.json").write_text(json.dumps(_history(stage)))
    metrics = {f"recall@{k}": min(1.0, 0.3 + k / 20) for k in range(1, 11)} | {"mrr@10": 0.5, "ndcg@10": 0.6}
    model = {"direct": {"text->product": metrics}, "reason": {"text->product": metrics},
             "gallery_size": 10, "n_queries": {"text->product": 10}, "split": "test",
             "chance": {"text->product": {f"recall@{k}": k / 10 for k in range(1, 11)}},
             "zero_shot": {"direct": {"classification": {"accuracy": 0.7, "macro_f1": 0.6, "n": 10},
                                      "attributes": {"colour": 0.5, "mean": 0.5}}},
             "faithfulness": {"chain_cosine": 0.9, "reason_direct_cosine": 0.8, "chains_sampled_for": 10,
                              "reason": {"text->product": 0.6}, "swapped": {"text->product": 0.2}}}
    summary = {"split": "test", "results": {"grpo": EvaluationResult.from_dict(model)}, "table": "| retrieval |",
               "text_only": None}
    report = write_report(tmp_path / "eval", summary, run_dir=run, models={"grpo": "runs/x/grpo/final"})
    text = report.read_text()
    assert "| grpo | direct | 0.350 |" in main_table(summary["results"]) and "## Main table" in text
    assert "0.700" in zero_shot_table(summary["results"]) and "0.600 / 0.200" in faithfulness_table(summary["results"])
    pngs = sorted(p.name for p in (tmp_path / "eval").glob("*.png"))
    assert pngs == ["recall_at_k.png", "training_grpo.png", "training_sft.png"]
    for name in pngs:
        image = Image.open(tmp_path / "eval" / name)
        assert image.size[0] > 400 and len(set(image.convert("L").getdata())) > 10  # drawn, not blank
        assert f"![{name[:-4]}]({name})" in text
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["models"] == {"grpo": "runs/x/grpo/final"} and saved["results"] == {"grpo": model}
    assert read_results(tmp_path / "eval" / "metrics.json") == summary["results"]



def test_matryoshka_results_get_a_table_and_a_plot_of_recall_against_size(tmp_path):
    from moon_rl.evaluation.report import dims_table

    def at(r1: float) -> dict:
        return {"text->product": {"recall@1": r1, "mrr@10": r1}, "image->product": {"recall@1": r1 / 2, "mrr@10": 0.1}}

    model = {"direct": at(0.8), "gallery_size": 10, "n_queries": {"text->product": 5}, "split": "test",
             "dims": {"direct": {"256": at(0.8), "64": at(0.75), "32": at(0.6)}}}
    plain = {"direct": at(0.7), "gallery_size": 10, "n_queries": {"text->product": 5}, "split": "test"}
    results = {"sft": EvaluationResult.from_dict(model), "untrained": EvaluationResult.from_dict(plain)}
    summary = {"split": "test", "results": results, "table": "|", "text_only": None}
    table = dims_table(summary["results"])
    assert table.splitlines()[0] == "| model | mode | dim | text->product R@1 | image->product R@1 |"
    assert "| sft | direct | 64 | 0.750 | 0.375 |" in table and "untrained" not in table
    assert dims_table({"untrained": results["untrained"]}) is None
    text = write_report(tmp_path / "eval", summary, run_dir=None, models={"sft": "x"}).read_text()
    assert "## Embedding size (Matryoshka)" in text and "![recall_by_dim](recall_by_dim.png)" in text
    image = Image.open(tmp_path / "eval" / "recall_by_dim.png")
    assert image.size[0] > 400 and len(set(image.convert("L").getdata())) > 10


def _chain_result(colour: tuple[float, float], material: tuple[float, float] | None) -> EvaluationResult:
    metrics = {"recall@1": 0.5, "mrr@10": 0.5}
    chains = {"colour": {"right": colour[0], "wrong": colour[1], "chance": 0.375, "n": 3}}
    if material is not None:
        chains["material"] = {"right": material[0], "wrong": material[1], "chance": 5 / 9, "n": 2}
    return EvaluationResult(modes={"direct": {"text->product": metrics}, "reason": {"text->product": metrics}},
                            gallery_size=3, n_queries={"text->product": 3}, split="test", chain_attributes=chains)


def test_report_has_the_chain_attribute_table_and_metrics_json_keeps_it(tmp_path):
    # `sft` has no material numbers (e.g. an older metrics.json): its cell is a dash, and chance comes from `grpo`.
    results = {"sft": _chain_result((0.25, 0.5), None), "grpo": _chain_result((2 / 3, 1 / 3), (1.0, 0.0)),
               "untrained": EvaluationResult(modes={"direct": {"text->product": {"recall@1": 0.1}}})}
    summary = {"split": "test", "results": results, "table": "| retrieval |", "text_only": None}
    text = write_report(tmp_path, summary, run_dir=None, models={}).read_text()
    assert ("## Chain attribute accuracy (reason mode)" in text and
            "| model | mode | colour right / wrong | material right / wrong |\n|---|---|---:|---:|\n"
            "| sft | reason | 0.250 / 0.500 | – / – |\n"
            "| grpo | reason | 0.667 / 0.333 | 1.000 / 0.000 |\n"
            "| chance | – | 0.375 / – | 0.556 / – |\n" in text)
    # The main table: one row per model and evaluated mode, each with its own Recall@1, in the results' order.
    rows = [line.split(" | ")[:3] for line in main_table(results).splitlines()[2:]]
    assert rows == [["| sft", "direct", "0.500"], ["| sft", "reason", "0.500"], ["| grpo", "direct", "0.500"],
                    ["| grpo", "reason", "0.500"], ["| untrained", "direct", "0.100"]]
    saved = json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert saved["grpo"]["chain_attributes"]["material"] == {"right": 1.0, "wrong": 0.0, "chance": 5 / 9, "n": 2}


def test_eval_command_prints_the_main_table_read_back_from_metrics_json(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import moon_rl.evaluation.report as report
    from cli import app

    results = {"grpo": _chain_result((0.5, 0.0), None), "untrained": EvaluationResult(
        modes={"direct": {"text->product": {"recall@1": 0.1}}}, zero_shot={"direct": {"attributes": {"mean": 0.25}}})}
    summary = {"split": "test", "results": results, "table": "| retrieval |", "text_only": None}

    def run_eval(recipe, models, out, *, run_dir):  # the evaluation itself is tested above; here, what is printed
        assert set(models) == {"grpo"}
        write_report(tmp_path / "eval", summary, run_dir=None, models={"grpo": str(models["grpo"])})
        return tmp_path / "eval"

    monkeypatch.setattr(report, "run_eval", run_eval)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\n")
    result = CliRunner().invoke(app, ["eval", str(recipe), "--model", str(tmp_path / "run" / "grpo" / "final")])
    assert result.exit_code == 0, result.output
    assert main_table(results) in result.output and "| untrained | direct | 0.100 | – | 0.250 |" in result.output
    assert result.output.count("| grpo |") == 2  # its two modes; chain_attributes is no row


def test_no_chain_attribute_section_without_reason_chains(tmp_path):
    results = {"untrained": EvaluationResult(modes={"direct": {"text->product": {"recall@1": 0.1}}})}
    summary = {"split": "test", "results": results, "table": "| retrieval |", "text_only": None}
    assert "Chain attribute" not in write_report(tmp_path, summary, run_dir=None, models={}).read_text()


def _grpo_spread_history() -> list[dict]:
    return [row | {"frac_reward_zero_std": 0.5 - s / 20, "spread/group_embedding_cosine": 0.9 - s / 40,
                   "reward_std": 0.1 + s / 100, "chain/colour": s / 10, "chain/material": 0.2 + s / 20,
                   "reward_judge/colour": 0.4 + s / 50}
            for s, row in enumerate(_history("grpo"), start=1)] + [{"step": 8, "train_runtime": 1.0}]


def test_grpo_curves_gain_spread_and_chain_panels_only_when_logged(tmp_path):
    titles = {panel.title: found for panel, found in training_panels(_grpo_spread_history(), "grpo")}
    assert titles["group spread (zero-std groups, completion cosine)"] == ["frac_reward_zero_std",
                                                                          "spread/group_embedding_cosine"]
    assert titles["sampled chains naming the right value"] == ["chain/colour", "chain/material"]
    assert titles["reward preferred the right chain (groups that disagree)"] == ["reward_judge/colour"]
    assert titles["reward (weighted total; mean within-group std)"] == ["reward", "reward_std"]
    old = {panel.title: found for panel, found in training_panels(_history("grpo"), "grpo")}
    assert list(old) == ["reward (weighted total; mean within-group std)", "reward per function (mean)", "InfoNCE",
                         "completion length (tokens)"] and old["reward (weighted total; mean within-group std)"] == [
                             "reward"]
    # Seven panels draw four rows, the older run's four two: both real images, the new one taller.
    with_spread = Image.open(training_curves(_grpo_spread_history(), "grpo", tmp_path / "new.png"))
    without = Image.open(training_curves(_history("grpo"), "grpo", tmp_path / "old.png"))
    assert with_spread.size[1] > without.size[1] * 1.3 and with_spread.size[0] == without.size[0]
    assert len(set(with_spread.convert("L").getdata())) > 10


@pytest.mark.slow
def test_run_executes_every_stage_then_skips_finished_ones(tmp_path):
    from typer.testing import CliRunner

    from moon_rl.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(
        tmp_path / "run", sft={**TINY_SFT, "max_steps": 4, "save_steps": 2}, grpo=TINY_GRPO,
        eval={"modes": ["direct", "reason"], "baselines": ["untrained"]},  # the schema's modes (faithfulness: reason)
        embed={"max_new_tokens": 8}))
    runner = CliRunner()
    first = runner.invoke(app, ["run", str(recipe)])
    assert first.exit_code == 0, first.output
    out = tmp_path / "run"
    assert (out / "embed" / "embed.json").is_file() and (out / "eval" / "report.md").is_file()
    assert len(list((out / "eval").glob("*.png"))) == 3
    results = read_results(out / "eval" / "metrics.json")
    assert set(results) == {"sft", "grpo", "untrained"} and results["grpo"].faithfulness is not None
    assert "| sft | direct |" in first.output  # the main table is printed last
    stamp = (out / "sft" / "final" / "moon_rl.json").stat().st_mtime_ns
    again = runner.invoke(app, ["run", str(recipe), "--set", "stages=[sft,grpo,embed]"])
    assert again.exit_code == 0, again.output
    assert (out / "sft" / "final" / "moon_rl.json").stat().st_mtime_ns == stamp  # finished: skipped


def test_a_stage_without_logged_steps_gets_a_line_saying_why_not_a_silent_gap(tmp_path):
    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    (run / "sft" / "log_history.json").write_text(json.dumps(_history("sft")))
    (run / "grpo").mkdir()
    # A 2-step GRPO at logging_steps 10: only the Trainer's final summary row.
    (run / "grpo" / "log_history.json").write_text(json.dumps([{"step": 2, "train_runtime": 3.0, "train_loss": 0.1}]))
    missing: list[str] = []
    written = stage_training_curves(run, tmp_path, missing)
    assert [p.name for p in written] == ["training_sft.png"]
    assert missing == [f"`training_grpo.png` not drawn: {run / 'grpo' / 'log_history.json'} holds no logged training "
                       "step (the stage ran fewer steps than its `logging_steps`)"]
