"""A catalogue whose pairs give several (graded) positives trains through SFT and GRPO and evaluates with any-hit
metrics, end to end through `moon-rl run`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import TINY_GRPO, TINY_SFT, tiny_recipe


def _several_positives_catalogue(source: Path, folder: Path) -> list[dict]:
    """A copy in `folder` of the 48-product synthetic catalogue `source`, with its text-query pairs merged two by two
    into pairs with two graded positives (train and test); returns the new test pairs."""
    shutil.copytree(source, folder)  # the shared catalogue stays as it is
    test_pairs = []
    for split in ("train", "test"):
        path = folder / f"pairs_{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        text = [r for r in rows if isinstance(r["anchor"], dict) and r["anchor"].get("text")]
        others = [r for r in rows if r not in text]
        merged = [{"anchor": first["anchor"], "positives": [first["positive"], second["positive"]], "relevance": [2, 1]}
                  for first, second in zip(text[0::2], text[1::2], strict=False)]
        rows = merged + others
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        if split == "test":
            test_pairs = rows
    return test_pairs


@pytest.mark.slow
def test_run_trains_and_evaluates_a_catalogue_with_several_positives(tmp_path, synthetic_catalogue):
    from typer.testing import CliRunner

    from moon_rl.cli import app
    from moon_rl.data.catalogue import load_catalogue
    from moon_rl.evaluation.retrieval import evaluate_embedder
    from moon_rl.modeling.embedder import MoonEmbedder

    test_pairs = _several_positives_catalogue(synthetic_catalogue(48, 3, 56), tmp_path / "cat")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(tmp_path / "run", sft={**TINY_SFT, "max_steps": 4, "save_steps": 4}, grpo=TINY_GRPO,
                                  eval={}))
    result = CliRunner().invoke(app, ["run", str(recipe), "--set", f"data.catalogue={tmp_path / 'cat'}",
                                      "--set", "stages=[sft,grpo,eval]"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "run"
    merged = sum(1 for p in test_pairs if "positives" in p)
    assert merged >= 3
    metrics = json.loads((out / "eval" / "metrics.json").read_text())["results"]["grpo"]
    assert metrics["n_queries"]["text->product"] == merged  # one query per pair, however many positives
    # Any-hit metrics: a query's hit is its better-ranked positive. Rank each positive on its own and compare.
    import numpy as np

    from moon_rl.evaluation.retrieval import positive_ranks

    catalogue = load_catalogue(tmp_path / "cat")
    model = MoonEmbedder.load(out / "grpo" / "final")
    both = evaluate_embedder(model, catalogue, "test", zero_shot=False).modes["direct"]["text->product"]
    assert both == pytest.approx({key: metrics["direct"]["text->product"][key] for key in both})
    pairs = [p for p in catalogue.pairs["test"] if p.positives is not None]
    gallery = catalogue.gallery("test")
    gallery_vecs = model.encode([catalogue.products[pid] for pid in gallery], load_image=catalogue.image)
    query_vecs = model.encode([p.anchor for p in pairs], load_image=catalogue.image)
    ranks = np.stack([positive_ranks(query_vecs, gallery_vecs, [gallery.index(p.positive_ids[i]) for p in pairs])
                      for i in range(2)])
    best = ranks.min(axis=0)
    for k in (1, 5, 10):
        assert both[f"recall@{k}"] == pytest.approx(np.mean(best < k))
    assert both["mrr@10"] == pytest.approx(np.mean(np.where(best < 10, 1 / (best + 1), 0)))
    assert (ranks[0] != ranks[1]).all()  # two products, two ranks: the minimum is a real choice
