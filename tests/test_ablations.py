"""`bench/ablations.py`: each variant trains what its label says, the table holds each variant's own numbers, and a
verdict compares the claim's two variants by the seed spread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import import_bench


@pytest.fixture(scope="module")
def ablations():
    return import_bench("ablations")


def _row(text: str, start: str) -> list[str]:
    (line,) = [line for line in text.splitlines() if line.startswith(start)]
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_verdicts_compare_each_claims_two_variants_by_the_larger_seed_spread(ablations):
    def seeds(text: float, image: float, spread: float = 0.01) -> list[dict[str, float]]:
        return [{"text->product": text - spread, "image->product": image}, {"text->product": text + spread,
                                                                             "image->product": image}]

    runs = {"b": seeds(0.70, 0.30), "c": seeds(0.60, 0.30), "d": seeds(0.50, 0.30), "e": seeds(0.605, 0.30),
            "f": seeds(0.60, 0.30, spread=0.2)}
    lines = dict(zip([claim for claim, _, _ in ablations.CLAIMS], ablations.verdicts(runs, 2), strict=True))
    assert lines["(1) modality fusion helps"].endswith(
        "(c) vs (d): text R@1 0.600 vs 0.500 (+0.100, spread 0.010): **supported**; "
        "image R@1 0.300 vs 0.300 (+0.000, spread 0.000): **not shown (within the seed spread)**")
    assert "text R@1 0.600 vs 0.700 (-0.100, spread 0.010): **contradicted**" in lines[
        "(2a) joint contrastive + RL helps over SFT alone"]
    # The format-only variant's spread (0.2) swallows a difference that (e)'s small spread would not.
    assert "(+0.000, spread 0.200): **not shown (within the seed spread)**" in lines[
        "(2b) the retrieval reward matters (vs a format-only reward)"]
    assert "text R@1 0.600 vs 0.605 (-0.005, spread 0.010): **not shown" in lines["(3) FIRE helps"]
    # One seed has no spread: nothing is called supported or contradicted from it.
    assert all("one seed" in line for line in ablations.verdicts({k: v[:1] for k, v in runs.items()}, 1))


@pytest.mark.slow
def test_quick_ablations_train_each_variant_as_labelled_and_report_its_own_numbers(ablations, tmp_path):
    results = ablations.main(["--quick", "--out", str(tmp_path), "--n-products", "48", "--sft-steps", "6",
                              "--grpo-steps", "2"])
    text = results.read_text()
    seed0 = tmp_path / "seed0"
    metrics = {name: json.loads((seed0 / name / "result.json").read_text()) for name in ablations.VARIANTS}
    for name, (label, _, _) in ablations.VARIANTS.items():
        cells = _row(text, f"| ({name}) {label} |")
        got = metrics[name]
        assert cells[1:4] == [got["mode"], f"{got['text->product']:.3f}", f"{got['image->product']:.3f}"], name
        assert cells[-2] == ("–" if got["swapped_text_r1"] is None else f"{got['swapped_text_r1']:.3f}"), name

    def final(name: str) -> Path:
        return seed0 / name / ("sft" if ablations.VARIANTS[name][2] is None else "grpo") / "final"

    def heads(name: str) -> dict:
        return json.loads((final(name) / "heads_config.json").read_text())

    # The ablated module is off in its variant and on in the full recipe; (a) never learnt to reason.
    assert (heads("c")["fusion"], heads("c")["fire"]) == (True, True)
    assert (heads("d")["fusion"], heads("e")["fire"]) == (False, False)
    assert (heads("d")["fire"], heads("e")["fusion"]) == (True, True)
    assert not json.loads((final("a") / "moon_rl.json").read_text())["reasoning_trained"]
    assert metrics["a"]["mode"] == "direct" and metrics["c"]["mode"] == "reason"
    assert metrics["a"]["chain_cosine"] is None and metrics["c"]["chain_cosine"] is not None
    # (c) and (f) refine (b)'s SFT model; (f) is rewarded for its format alone, (c) for retrieval too.
    for name in ("c", "f"):
        used = yaml.safe_load((final(name) / "recipe.yaml").read_text())
        assert Path(used["grpo"]["init_from"]) == seed0 / "b" / "sft" / "final", name
    logged = {name: {key for row in json.loads((seed0 / name / "grpo" / "log_history.json").read_text())
                     for key in row if key.startswith("rewards/") and key.endswith("/mean")} for name in ("c", "f")}
    assert logged["f"] == {"rewards/format/mean"}
    assert any("retrieval" in key for key in logged["c"]) and "rewards/format/mean" in logged["c"]
    assert "| MiniLM (text only) |" in text and "## Verdicts" in text
    assert text.count("not shown (one seed") == 2 * len(ablations.CLAIMS) and "**supported**" not in text
