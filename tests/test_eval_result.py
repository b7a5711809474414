"""`EvaluationResult`: metrics.json's layout round-trips, older files load, the primary metric follows its rule."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from moon_rl.evaluation.report import main_table, read_results
from moon_rl.evaluation.result import EvaluationResult
from moon_rl.evaluation.retrieval import evaluate_embedder
from tests.test_retrieval_eval import _attribute_catalogue, _ChainEmbedder


def _evaluate(modes: tuple[str, ...], **kwargs) -> EvaluationResult:
    return evaluate_embedder(_ChainEmbedder(), _attribute_catalogue(), "test", modes=modes, **kwargs)


def test_a_real_result_comes_back_from_its_json_with_the_layout_metrics_json_always_had():
    result = _evaluate(("direct", "reason"), faithfulness=True, dims=[4])
    # Every field measured: a field that `to_dict` dropped would come back None and fail the comparison below.
    assert [f.name for f in fields(result) if getattr(result, f.name) is None] == []
    saved = json.loads(json.dumps(result.to_dict()))
    assert EvaluationResult.from_dict(saved) == result
    assert set(EvaluationResult.from_dict(saved).modes) == {"direct", "reason"}
    # The key order `evaluate_embedder` wrote before the typed result: metrics.json files stay byte-identical.
    assert list(saved) == ["direct", "dims", "zero_shot", "reason_format_rate", "reason_examples", "chain_attributes",
                           "reason", "faithfulness", "gallery_size", "n_queries", "chance", "split"]
    assert saved["reason"] == result.modes["reason"] and saved["n_queries"] == {"text->product": 3}
    assert "primary_metric" not in saved  # derived, so not stored: files written before it read the same


def _metrics(r1: float) -> dict:
    return {"recall@1": r1, "recall@5": 1.0, "mrr@10": r1, "ndcg@10": r1}


def test_an_old_metrics_json_loads_and_reads_the_same(tmp_path):
    # As the first `moon-rl eval` wrote it: no zero_shot, faithfulness, chain_attributes nor dims yet.
    old = {"direct": {"text->product": _metrics(0.25), "image->product": _metrics(0.5)},
           "reason_format_rate": 0.75, "reason_examples": ["<think>red</think>"],
           "reason": {"text->product": _metrics(0.4), "image->product": _metrics(0.3)},
           "gallery_size": 12, "n_queries": {"text->product": 4, "image->product": 4},
           "chance": {"text->product": _metrics(1 / 12), "image->product": _metrics(1 / 12)}, "split": "test"}
    minilm = {"direct": {"text->product": _metrics(0.2), "image->product": None}, "zero_shot": {}, "gallery_size": 12,
              "n_queries": {"text->product": 4, "image->product": 4}, "chance": old["chance"], "split": "test"}
    metrics = {"split": "test", "results": {"sft": old, "minilm": minilm}, "text_only": None, "table": "|"}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics, indent=2))

    results = read_results(tmp_path / "metrics.json")
    sft = results["sft"]
    assert list(sft.modes) == ["direct", "reason"]  # info keys are not modes
    assert (sft.gallery_size, sft.split, sft.reason_format_rate) == (12, "test", 0.75)
    assert sft.zero_shot is None and sft.faithfulness is None and sft.chain_attributes is None and sft.dims is None
    assert sft.recall_at_1("reason", "image->product") == 0.3
    assert results["minilm"].recall_at_1("direct", "image->product") is None and results["minilm"].zero_shot == {}
    # Written back, each entry is the file's own text: nothing added, nothing dropped, same order.
    for name, entry in metrics["results"].items():
        assert json.dumps(results[name].to_dict()) == json.dumps(entry)
    table = main_table(results)
    assert table.count("\n") == 4  # header, rule, sft direct, sft reason, minilm direct
    assert "| sft | reason | 0.400 | 0.300 | – | – |" in table and "gallery_size" not in table


def test_a_key_that_is_neither_mode_nor_info_is_refused():
    with pytest.raises(ValueError, match=r"unknown keys \['galery_size'\]"):
        EvaluationResult.from_dict({"direct": {"text->product": _metrics(0.1)}, "galery_size": 3})


def test_primary_metric_is_reason_text_recall_at_1_when_reason_was_evaluated_else_direct():
    both = _evaluate(("direct", "reason"), zero_shot=False)
    assert both.primary_metric == "reason/text->product/recall@1"
    assert both.primary_value == both.recall_at_1("reason", "text->product")
    direct = _evaluate(("direct",), zero_shot=False)
    assert direct.primary_metric == "direct/text->product/recall@1"
    assert direct.primary_value == direct.recall_at_1("direct", "text->product")
    # Not the first mode nor the last: `reason` first in the dict still wins over `direct`, and vice versa.
    reason_first = EvaluationResult(modes={"reason": {"text->product": _metrics(0.6)},
                                           "direct": {"text->product": _metrics(0.1)}})
    assert (reason_first.primary_metric, reason_first.primary_value) == ("reason/text->product/recall@1", 0.6)


def test_primary_metric_falls_back_to_the_first_scored_task():
    # text->product wins wherever the mode lists it...
    text_later = EvaluationResult(modes={"direct": {"image->product": _metrics(0.3), "text->product": _metrics(0.1)}})
    assert (text_later.primary_metric, text_later.primary_value) == ("direct/text->product/recall@1", 0.1)
    # ...and only where it is not scored does the first scored task stand in.
    # A text-only baseline's image task is None; a catalogue without text queries has no text->product.
    no_text = EvaluationResult(modes={"direct": {"image->product": None, "product->product": _metrics(0.3)}})
    assert (no_text.primary_metric, no_text.primary_value) == ("direct/product->product/recall@1", 0.3)
    text_not_applicable = EvaluationResult(modes={"direct": {"text->product": None, "image->product": _metrics(0.2)}})
    assert text_not_applicable.primary_metric == "direct/image->product/recall@1"
    nothing = EvaluationResult(modes={})
    assert (nothing.primary_metric, nothing.primary_value) == (None, None)
    with pytest.raises(KeyError):
        nothing.recall_at_1("direct", "text->product")
