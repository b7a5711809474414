"""`bench/ablations.py --quick`: every variant trains and is evaluated; RESULTS.md holds the table and verdicts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_ablations_write_the_table_and_verdicts(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import ablations
    finally:
        sys.path.remove(str(ROOT / "bench"))
    results = ablations.main(["--quick", "--out", str(tmp_path)])
    assert results == tmp_path / "RESULTS.md"
    text = results.read_text()
    for name, (label, _, _) in ablations.VARIANTS.items():
        assert f"| ({name}) {label} |" in text
        metrics = json.loads((tmp_path / "seed0" / name / "result.json").read_text())
        assert 0.0 <= metrics["text->product"] <= 1.0 and metrics["seconds"] > 0
    assert "| MiniLM (text only) |" in text and "--quick" in text and "## Verdicts" in text
    # One seed has no spread: no claim may be called supported from it.
    assert text.count("not shown (one seed") == 2 * len(ablations.CLAIMS) and "**supported**" not in text
    # The direct-only variant never learnt to reason; the others were evaluated in reason mode with faithfulness.
    assert json.loads((tmp_path / "seed0" / "a" / "result.json").read_text())["mode"] == "direct"
    assert json.loads((tmp_path / "seed0" / "c" / "result.json").read_text())["chain_cosine"] is not None
