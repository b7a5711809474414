"""Sharded, resumable `moon-rl embed`: shards written as they finish, reruns continue, processes share the work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace as NS

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from moon_rl.data.catalogue import load_catalogue
from moon_rl.data.synthetic import SyntheticConfig, synthesize
from moon_rl.errors import MoonError
from moon_rl.inference.pipeline import embed_catalogue
from moon_rl.inference.shards import ShardPlan, finished_shards, shard_folder
from moon_rl.modeling.inputs import batch_order_key
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]


class TableEmbedder:
    """A fake model: a fixed random vector per product id, counting what it embeds; `crash_after` batches it raises
    (a run killed mid-way)."""

    heads = NS(config=NS(embed_dim=8, matryoshka_dims=[]))
    meta: dict = {}
    max_images = 1

    def __init__(self, ids, crash_after: int | None = None):
        rng = np.random.default_rng(0)
        self.table = {pid: v / np.linalg.norm(v) for pid, v in zip(ids, rng.normal(size=(len(ids), 8)), strict=True)}
        self.crash_after, self.batches, self.embedded = crash_after, 0, []

    def preprocess(self, items):
        return [item.id for item in items]

    def embed_prompts(self, ids, mode="direct", items=None, dim=None):
        if self.crash_after is not None and self.batches == self.crash_after:
            raise RuntimeError("killed")
        self.batches += 1
        self.embedded += ids
        return np.stack([self.table[pid] for pid in ids]).astype(np.float32)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cat") / "synthetic"
    synthesize(folder, SyntheticConfig(n_products=40, seed=1, image_size=56))
    return load_catalogue(folder)


def read_output(out: Path) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(out / "embeddings.parquet")
    return table.column("id").to_pylist(), np.stack(table.column("vector").to_numpy(zero_copy_only=False))


def test_shard_plan_aligns_shards_with_batches_and_deals_them_round_robin():
    plan = ShardPlan.make([f"p{i}" for i in range(23)], shard_size=5, batch_size=4)
    assert plan.shard_size == 8 and plan.count == 3  # rounded up to whole batches: a shard's batches are global ones
    assert [list(plan.shard(s)) for s in range(3)] == [[f"p{i}" for i in range(a, min(a + 8, 23))] for a in (0, 8, 16)]
    assert plan.owned_by(0, 2) == [0, 2] and plan.owned_by(1, 2) == [1] and plan.owned_by(2, 4) == [2]


def test_a_killed_run_resumes_from_its_finished_shards_and_ends_as_a_straight_run(catalogue, tmp_path):
    ids = list(catalogue.products)
    straight = tmp_path / "straight"
    embed_catalogue(TableEmbedder(ids), catalogue, straight, batch_size=4, shard_size=8, show_progress=False)
    assert not shard_folder(straight).exists()  # merged and cleaned up

    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="killed"):  # dies in its 6th batch: shards 0 and 1 (2 batches each) done
        embed_catalogue(TableEmbedder(ids, crash_after=5), catalogue, out, batch_size=4, shard_size=8,
                        show_progress=False)
    assert not out.exists() and finished_shards(shard_folder(out)) == {0, 1}
    again = TableEmbedder(ids)
    summary = embed_catalogue(again, catalogue, out, batch_size=4, shard_size=8, show_progress=False)
    assert summary.resumed_shards == 2 and summary.shards == 6 and summary.count == 48  # 40 + 8 listed twice
    order = [p.id for p in sorted(catalogue.products.values(), key=lambda p: batch_order_key(p, 1))]
    finished = {pid for shard in (0, 1) for pid in ShardPlan.make(order, 8, 4).shard(shard)}
    assert sorted(again.embedded) == sorted(set(order) - finished)  # the finished shards are not embedded again
    assert read_output(out)[0] == read_output(straight)[0]
    np.testing.assert_array_equal(read_output(out)[1], read_output(straight)[1])
    assert (out / "ids.json").read_bytes() == (straight / "ids.json").read_bytes()
    assert (out / "index.faiss").read_bytes() == (straight / "index.faiss").read_bytes()
    manifest = json.loads((out / "embed.json").read_text())
    assert manifest["work"]["resumed_shards"] == 2 and manifest["work"]["embedded"] == 32
    assert not shard_folder(out).exists()


def test_shards_of_other_settings_are_refused_not_mixed(catalogue, tmp_path):
    ids = list(catalogue.products)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        embed_catalogue(TableEmbedder(ids, crash_after=2), catalogue, out, batch_size=4, shard_size=8,
                        show_progress=False)
    with pytest.raises(MoonError, match=r"other settings \(batch_size: 4 then, 8 now.*delete the folder"):
        embed_catalogue(TableEmbedder(ids), catalogue, out, batch_size=8, shard_size=8, show_progress=False)
    with pytest.raises(MoonError, match="dim: None then, 4 now"):
        embed_catalogue(TableEmbedder(ids), catalogue, out, batch_size=4, shard_size=8, show_progress=False, dim=4)


def _embed_command(recipe: Path, model: Path, out: Path, nproc: int = 1) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                 "127.0.0.1", "--master_port", str(free_port())] if nproc > 1 else [sys.executable])
    return [*launcher, str(ROOT / "cli.py"), "embed", str(recipe), "--model", str(model), "--out", str(out)]


@pytest.mark.slow
def test_torchrun_two_processes_and_a_killed_rerun_give_the_one_process_result(tmp_path, synthetic_catalogue):
    """`moon-rl embed` under `torchrun --nproc_per_node 2` (gloo): the same ids in the same order and the same vectors
    (1e-5) as one process; and one process killed (SIGKILL) after its first shards, then rerun, ends with the same
    files as the straight run, having embedded only the shards that were not finished."""
    from tests.helpers import served_index

    cat = synthetic_catalogue(64, 0, 56)
    _, _, catalogue = served_index(tmp_path / "base", cat)
    n = len(catalogue.products)  # 64 products, the test split's listed twice
    shards = -(-n // 4)
    model = tmp_path / "base" / "model"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{lora: null}}\ndata: {{catalogue: {cat}}}\n"
                      "embed: {batch_size: 4, shard_size: 4, mode: direct}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(_embed_command(recipe, model, tmp_path / "one"), capture_output=True, text=True, env=env,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(_embed_command(recipe, model, tmp_path / "two", nproc=2), capture_output=True, text=True,
                         env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count(f"embedded {n} products") == 1  # reported once, by the main process
    ids_one, vectors_one = read_output(tmp_path / "one")
    ids_two, vectors_two = read_output(tmp_path / "two")
    assert ids_two == ids_one and len(ids_one) == n
    np.testing.assert_allclose(vectors_two, vectors_one, atol=1e-5)
    assert json.loads((tmp_path / "two" / "embed.json").read_text())["work"]["processes"] == 2

    # Killed after 3 of its shards, then rerun.
    killed = tmp_path / "killed"
    process = subprocess.Popen(_embed_command(recipe, model, killed), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300
    while len(finished_shards(shard_folder(killed))) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = finished_shards(shard_folder(killed))
    assert 3 <= len(done) < shards and not killed.exists(), done
    rerun = subprocess.run(_embed_command(recipe, model, killed), capture_output=True, text=True, env=env,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(done)} of {shards} shards were finished" in rerun.stderr
    ids_killed, vectors_killed = read_output(killed)
    assert ids_killed == ids_one
    np.testing.assert_array_equal(vectors_killed, vectors_one)
    for name in ("ids.json", "index.faiss", "recipe.yaml"):
        assert (killed / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    index = faiss.read_index(str(killed / "index.faiss"))
    np.testing.assert_array_equal(index.reconstruct_n(0, index.ntotal), vectors_one)
    manifests = [json.loads((folder / "embed.json").read_text()) for folder in (killed, tmp_path / "one")]
    for manifest in manifests:
        for key in ("seconds", "items_per_s", "work"):
            manifest.pop(key)
    assert manifests[0] == manifests[1]
