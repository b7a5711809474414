"""bench/grpo_learns.py's pure parts, without training: results-file sections, training-signal windows, the bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import import_bench

grpo_learns = import_bench("grpo_learns")
results_md = import_bench("results_md")


OTHER = "<!-- BEGIN other -->\nsomeone else's table\n<!-- END other -->"


def test_section_is_appended_when_absent_then_replaced_in_place():
    text = "# Results\n\nhand-written notes\n"
    once = results_md.replace_section(text, "mine", "## Mine\nv1")
    assert once == "# Results\n\nhand-written notes\n\n<!-- BEGIN mine -->\n## Mine\nv1\n<!-- END mine -->\n"
    twice = results_md.replace_section(once, "mine", "## Mine\nv2")
    assert twice == once.replace("v1", "v2")
    assert results_md.replace_section("", "mine", "x") == "<!-- BEGIN mine -->\nx\n<!-- END mine -->\n"


def test_replacing_a_section_leaves_the_other_section_and_text_intact_and_is_idempotent():
    text = f"intro\n\n{OTHER}\n\n<!-- BEGIN mine -->\nold\n<!-- END mine -->\n\ntrailer\n"
    new = results_md.replace_section(text, "mine", "\nnew\n\n")
    assert new == text.replace("old", "new")
    assert results_md.replace_section(new, "mine", "new") == new
    assert results_md.replace_section(new, "other", "someone else's table") == new


def test_adopting_unmarked_text_replaces_it_and_keeps_other_sections():
    text = f"# Ablations\n\nold table\n\n{OTHER}\n\n## In plain words\nold notes\n"
    new = results_md.replace_section(text, "ablations", "# Ablations\nnew table", adopt_unmarked=True)
    assert new == f"<!-- BEGIN ablations -->\n# Ablations\nnew table\n<!-- END ablations -->\n\n{OTHER}\n"
    assert results_md.replace_section(new, "ablations", "# Ablations\nnew table", adopt_unmarked=True) == new


def test_unbalanced_markers_are_refused():
    with pytest.raises(ValueError, match="unbalanced"):
        results_md.replace_section("<!-- BEGIN mine -->\nno end\n", "mine", "x")


def test_write_section_creates_the_file(tmp_path):
    path = results_md.write_section(tmp_path / "sub" / "RESULTS.md", "mine", "x")
    results_md.write_section(path, "mine", "x")
    assert path.read_text() == "<!-- BEGIN mine -->\nx\n<!-- END mine -->\n"


def test_edge_windows_take_a_fifth_of_the_steps_and_at_least_one():
    assert grpo_learns.edge_windows(list(range(10))) == ([0, 1], [8, 9])
    assert grpo_learns.edge_windows([1.0, 2.0, 3.0]) == ([1.0], [3.0])
    assert grpo_learns.edge_windows([5.0]) == ([5.0], [5.0])


def test_training_signal_reads_trl_log_history():
    history: list[dict[str, Any]] = [
        {"step": i + 1, "frac_reward_zero_std": 0.5 if i < 5 else 0.0, "rewards/retrieval_rank/mean": float(i),
         "spread/group_embedding_cosine": 0.9, "chain/colour": 0.1 * i,
         **({"reward_judge/pattern": 0.25 * (i % 3)} if i % 2 else {})} for i in range(10)]
    history.append({"step": 10, "train_runtime": 12.0, "train_loss": 0.1})  # TRL's end-of-training summary row
    signal = grpo_learns.training_signal(history, "rewards/retrieval_rank/mean")
    assert signal["logged_steps"] == 10 and signal["zero_spread"] == pytest.approx(0.25)
    assert (signal["reward_first"], signal["reward_last"], signal["reward_gain"]) == (0.5, 8.5, 8.0)
    assert signal["group_cosine"] == pytest.approx(0.9)
    assert signal["chain_first/colour"] == pytest.approx(0.05) and signal["chain_last/colour"] == pytest.approx(0.85)
    assert "chain_first/brand" not in signal
    # Logged on the steps where some group had to choose (1, 3, 5, 7, 9): their mean, 0.25 * (1+0+2+1+0) / 5.
    assert signal["reward_judge/pattern"] == pytest.approx(0.2) and signal["reward_judge/brand"] is None
    assert grpo_learns.training_signal(history, None)["reward_first"] is None


def test_beyond_spread_needs_a_difference_larger_than_the_larger_spread():
    lower = [0.0, 0.5]  # mean 0.25, population std 0.25
    assert grpo_learns.beyond_spread([0.25, 0.75], lower) == (0.25, 0.25, False)  # equal to the spread: FAIL
    assert grpo_learns.beyond_spread([0.5, 1.0], lower) == (0.5, 0.25, True)  # above it: PASS
    assert grpo_learns.beyond_spread([0.4, 0.6], [0.0, 0.5])[2] is False  # +0.25 vs the larger std, 0.25
    assert grpo_learns.beyond_spread([0.9], [0.1])[2] is False  # one seed: no spread to beat


def _model(chain: float, text: float, image: float, swapped: float, cosine: float, direct: float) -> dict[str, Any]:
    return {**{f"chain/{attr}": chain for attr in grpo_learns.ATTRIBUTES},
            "reason/text->product": text, "reason/image->product": image, "direct/text->product": direct,
            "direct/image->product": image, "swapped/text->product": swapped, "chain_cosine": cosine,
            "reason_direct_cosine": 0.9}


def _run(seed: int, sft: dict[str, Any], grpo: dict[str, Any], first: float, last: float) -> dict[str, Any]:
    return {"seed": seed, "sft": sft, "grpo": grpo, "seconds": {"sft": 10.0 + seed, "grpo": 20.0},
            "signal": {"zero_spread": 0.2, "reward_first": first, "reward_last": last, "reward_gain": last - first}}


def test_bars_pass_and_fail_on_hand_made_seeds():
    runs = [_run(0, _model(0.5, 0.40, 0.20, 0.38, 0.97, 0.45), _model(0.95, 0.60, 0.40, 0.30, 0.90, 0.45), 0.2, 0.6),
            _run(1, _model(0.5, 0.42, 0.22, 0.40, 0.97, 0.47), _model(0.95, 0.62, 0.42, 0.32, 0.90, 0.47), 0.3, 0.7)]
    bars = grpo_learns.bars(runs)
    assert [bar.passed for bar in bars] == [True, True, True, True], [bar.detail for bar in bars]
    # The GRPO model's chains name colour 95% of the time, but material only 85%: bar 1 fails, on material alone.
    for run in runs:
        run["grpo"]["chain/material"] = 0.85
        run["grpo"]["swapped/text->product"] = run["grpo"]["reason/text->product"] - 0.05  # drop below 0.10
    bars = grpo_learns.bars(runs)
    assert [bar.passed for bar in bars] == [False, True, True, False]
    assert "material 0.850 ≥ 0.9 FAIL" in bars[0].detail and "brand 0.950 ≥ 0.9 PASS" in bars[0].detail
    assert "reasoning helps" in grpo_learns.reasoning_statement(runs, "grpo")
    assert "reasoning hurts" in grpo_learns.reasoning_statement(runs, "sft")  # 0.410 vs direct 0.460, spread 0.010
    for run in runs:
        run["sft"]["direct/text->product"] = run["sft"]["reason/text->product"]
    assert "no difference beyond the seed spread" in grpo_learns.reasoning_statement(runs, "sft")


def test_section_renders_tables_bars_and_reasoning_line():
    runs = [_run(s, _model(0.5, 0.4, 0.2, 0.38, 0.97, 0.45), _model(0.9, 0.6, 0.4, 0.3, 0.9, 0.45), 0.2, 0.6)
            for s in (0, 1)]
    args = grpo_learns.parse_args(["--quick", "--out", "/tmp/x", "--set", "grpo.max_steps=4"])
    text = grpo_learns.section(args, runs, "python bench/grpo_learns.py --quick", 1.5)
    assert text.startswith("## Does GRPO learn? (bench/grpo_learns.py)")
    assert "| SFT | 0.500 ± 0.000 |" in text and "`grpo.max_steps=4`" in text and "5. reason vs direct" in text
    assert "sft 10 ± 0, grpo 20 ± 0, eval_sft –" in text
    assert args.results == Path("/tmp/x/RESULTS.md") and args.seeds == [0]


def test_validation_runs_never_write_the_test_tables():
    """With the validation catalogue the numbers go to <out>/RESULTS.md unless --results says otherwise: a selection
    run must not overwrite bench/RESULTS.md's table of the test split."""
    validation = grpo_learns.parse_args(["--out", "/tmp/v", "--set", "data.synthetic.validation=true"])
    assert validation.results == Path("/tmp/v/RESULTS.md") and validation.seeds == [0, 1, 2]
    assert grpo_learns.parse_args(["--out", "/tmp/v"]).results == results_md.RESULTS
    chosen = grpo_learns.parse_args(["--set", "data.synthetic.validation=true", "--results", "/tmp/r.md"])
    assert chosen.results == Path("/tmp/r.md")


class _ChainStub:
    """`encode(..., return_completions=True)` returning a fixed chain per product id."""

    def __init__(self, chains: dict[str, str]):
        self.chains = chains

    def encode(self, products, mode, load_image, return_completions):
        assert mode == "reason" and return_completions
        return None, [self.chains[p.id] for p in products]


def test_trace_error_chains_count_truth_and_repeated_trace_per_listed_product():
    from types import SimpleNamespace

    errors = {"a": {"attribute": "colour", "true": "red", "trace": "blue"},
              "b": {"attribute": "colour", "true": "green", "trace": "grey"},
              "c": {"attribute": "pattern", "true": "dotted", "trace": "striped"},
              "d": {"attribute": "colour", "true": "pink", "trace": "teal"}}
    products = {pid: SimpleNamespace(id=pid) for pid in [*errors, "clean"]}
    catalogue = SimpleNamespace(manifest={"trace_errors": errors}, products=products, image=None)
    chains = {"a": "<think>colour red. pattern solid.</think>",  # the truth
              "b": "<think>colour grey.</think>",  # repeats the teacher's error
              "c": "<think>colour red. pattern striped.</think>",  # repeats it (another attribute's value is no matter)
              "d": "<think>colour pink teal.</think>"}  # names both: neither count
    found = grpo_learns.trace_error_chains(_ChainStub(chains), catalogue)
    assert found == {"repair/true": 0.25, "repair/trace": 0.5, "repair/products": 4.0}
    assert grpo_learns.trace_error_chains(_ChainStub({}), SimpleNamespace(manifest={})) == {}
