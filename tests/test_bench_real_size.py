"""bench/real_size_check.py on CPU, shrunk: the recipe runs SFT then GRPO on a locally built model folder whose processor
has the model's default pixel range, while training uses the recipe's; the table reports the plan beside each stage."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.slow
def test_real_size_check_runs_the_recipe_on_a_built_folder(tmp_path, capsys):
    import real_size_check

    code = real_size_check.main([
        "--device", "cpu", "--arch", "builtin:tiny-vl/small", "--steps", "2", "--completion-length", "6",
        "--n-products", "48", "--out", str(tmp_path),
        "--set", "sft.per_device_train_batch_size=2", "--set", "sft.gradient_accumulation_steps=1",
        "--set", "grpo.per_device_train_batch_size=4", "--set", "grpo.gradient_accumulation_steps=2",
        "--set", "grpo.num_generations=2"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    summary = json.loads(out.split("json: ", 1)[1].splitlines()[0])
    assert [s["stage"] for s in summary["stages"]] == ["sft", "grpo"]
    assert all(s["status"] == "ok" and s["plan"] > 0 for s in summary["stages"])
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 512 and config["text_config"]["vocab_size"] == 799
    # The folder carries the model's default range; the trained model, the 3B recipe's (what every prompt was fitted to).
    def size(folder: Path) -> dict:
        return json.loads((folder / "processor_config.json").read_text())["image_processor"]["size"]

    assert size(tmp_path / "model") == {"shortest_edge": 3136, "longest_edge": 12845056}
    assert size(tmp_path / "run" / "grpo" / "final" / "processor") == {"shortest_edge": 50176, "longest_edge": 200704}
    assert (tmp_path / "run" / "grpo" / "final" / "adapter").is_dir()  # the recipe's LoRA, trained on
