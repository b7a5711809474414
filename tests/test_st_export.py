"""sentence-transformers export: loads without moon-rl and reproduces `MoonEmbedder.encode(mode="direct")`."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
from PIL import Image

from moon_rl.errors import MoonError
from moon_rl.inference.st_export import export_sentence_transformers, generate_code
from moon_rl.modeling.embedder import MoonEmbedder, heads_config_for
from moon_rl.modeling.heads import MoonHeads
from moon_rl.modeling.inputs import EmbedItem
from moon_rl.modeling.loading import load_backbone

TEXTS = ["red striped cotton shirt", "blue dress"]
LORA = NS(r=4, alpha=8, dropout=0.0, target_modules=r".*language_model.*\.(q_proj|v_proj)")

# Runs in a fresh interpreter where `import moon_rl` fails: the exported folder must be self-contained.
ST_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys
    import numpy as np

    class BlockMoonRL(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "moon_rl":
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, BlockMoonRL())
    try:
        import moon_rl  # noqa: F401
        sys.exit("moon_rl is importable in the isolated interpreter")
    except ModuleNotFoundError:
        pass
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    work = sys.argv[1]
    spec = json.load(open(f"{work}/inputs.json"))
    images = [Image.open(p) for p in spec["images"]]
    texts = spec["texts"]
    queries = [texts[0], images[0], {"text": texts[1], "image": images[1]}, texts[1], images[1]]
    documents = [{"text": texts[0], "image": images[0]}, texts[1]]
    out = {}
    for name in spec["models"]:
        model = SentenceTransformer(f"{work}/{name}", trust_remote_code=True, device="cpu")
        out[f"{name}/query"] = model.encode(queries, batch_size=2)
        out[f"{name}/document"] = model.encode_document(documents)
        out[f"{name}/similarity"] = np.array([model.similarity_fn_name == "cosine",
                                              model.get_embedding_dimension()])
        if name == "full":  # save/load round trip of the loaded module
            model.save(f"{work}/resaved")
            again = SentenceTransformer(f"{work}/resaved", trust_remote_code=True, device="cpu")
            out["resaved/query"] = again.encode(queries)
            cut = SentenceTransformer(f"{work}/{name}", trust_remote_code=True, device="cpu", truncate_dim=16)
            out["full/query16"] = cut.encode(queries, batch_size=2)
    assert "moon_rl" not in sys.modules
    np.savez(f"{work}/st.npz", **out)
""")


def _spec(lora=None, matryoshka_dims=None) -> NS:
    return NS(name_or_path="builtin:tiny-vl", builtin_size="tiny", dtype="float32", trust_remote_code=False,
              attn_implementation="sdpa", quantization=None, lora=lora, image_min_pixels=56 * 56,
              image_max_pixels=112 * 112,
              heads=NS(embed_dim=64, fusion=NS(enabled=True, num_heads=4, chain=True),
                       fire=NS(enabled=True, layers=None, rank=8), matryoshka_dims=matryoshka_dims))


def _saved_embedder(folder: Path, spec: NS, seed: int) -> Path:
    """A tiny embedder whose zero-initialised parts (fusion out, FIRE up, LoRA B) are randomised, saved to `folder`."""
    model, processor = load_backbone(spec)
    embedder = MoonEmbedder(model, processor, MoonHeads(heads_config_for(model, spec.heads)),
                            meta={"base_model": "builtin:tiny-vl", "builtin_size": "tiny"})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in embedder.named_parameters():
            if "fusion.out" in name or "fire.up" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return embedder.save(folder)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Full and LoRA models saved, exported, embedded by moon-rl here and by sentence-transformers in a subprocess."""
    work = tmp_path_factory.mktemp("st-export")
    rng = np.random.default_rng(0)
    image_paths = []
    for i, size in enumerate([(112, 112), (80, 120)]):
        path = work / f"image{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        image_paths.append(str(path))
    images = [Image.open(p) for p in image_paths]
    reference = {}
    for name, spec, seed in [("full", _spec(matryoshka_dims=[32, 16]), 1), ("adapter", _spec(LORA), 2)]:
        saved = _saved_embedder(work / f"{name}-src", spec, seed)
        export_sentence_transformers(saved, work / name, model_spec=spec)
        embedder = MoonEmbedder.load(saved, model_spec=spec)
        queries = [TEXTS[0], images[0], {"text": TEXTS[1], "image": images[1]}, TEXTS[1], images[1]]
        reference[f"{name}/query"] = embedder.encode(queries, mode="direct")
        reference[f"{name}/query16"] = embedder.encode(queries, mode="direct", dim=16)
        documents = [EmbedItem(text=TEXTS[0], images=[images[0].convert("RGB")], kind="product"),
                     EmbedItem(text=TEXTS[1], kind="product")]
        reference[f"{name}/document"] = embedder.encode(documents, mode="direct")
    (work / "inputs.json").write_text(json.dumps({"images": image_paths, "texts": TEXTS, "models": ["full", "adapter"]}))
    env = {**os.environ, "HF_MODULES_CACHE": str(work / "hf-modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    # -I: no cwd / PYTHONPATH on sys.path; the editable install of moon-rl is blocked by the script's finder.
    proc = subprocess.run([sys.executable, "-I", "-c", ST_SCRIPT, str(work)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    st = dict(np.load(work / "st.npz"))
    return {"work": work, "reference": reference, "st": st}


@pytest.mark.parametrize("name", ["full", "adapter"])
@pytest.mark.parametrize("task", ["query", "document"])
def test_st_matches_moon_embedder(exported, name, task):
    ref, got = exported["reference"][f"{name}/{task}"], exported["st"][f"{name}/{task}"]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_truncate_dim_gives_the_matryoshka_prefix(exported):
    """sentence-transformers' `truncate_dim` keeps the prefix moon-rl's `encode(dim=16)` gives (ST does not
    renormalise; cosine similarity does), and the model card says how."""
    got, ref = exported["st"]["full/query16"], exported["reference"]["full/query16"]
    assert got.shape == ref.shape == (5, 16)
    np.testing.assert_allclose(got / np.linalg.norm(got, axis=1, keepdims=True), ref, atol=1e-5)
    assert "truncate_dim=16" in (exported["work"] / "full" / "README.md").read_text()
    assert "Matryoshka" not in (exported["work"] / "adapter" / "README.md").read_text()


def test_heads_and_lora_matter(exported):
    """The randomised fusion/FIRE/LoRA weights change the vectors, so the comparison above exercises them."""
    ref = exported["reference"]
    assert np.abs(ref["full/query"] - ref["adapter/query"]).max() > 1e-3
    assert np.abs(ref["full/query"] - ref["full/document"][:1]).max() > 1e-3


def test_export_folder_contents(exported):
    work = exported["work"]
    for name in ("full", "adapter"):
        folder = work / name
        assert json.loads((folder / "modules.json").read_text())[0]["type"] == "moon_st.MoonSentenceEmbedder"
        assert json.loads((folder / "config_sentence_transformers.json").read_text())["similarity_fn_name"] == "cosine"
        assert json.loads((folder / "moon_rl.json").read_text())["weights"] == "full"
        assert (folder / "model" / "config.json").is_file() and not (folder / "adapter").exists()
        assert "trust_remote_code=True" in (folder / "README.md").read_text()
        for target in ("moon_st", "embedder", "heads", "taps", "inputs", "compat", "loading", "prompts", "errors"):
            assert not _moon_rl_imports((folder / f"{target}.py").read_text()), target
    assert exported["st"]["full/similarity"].tolist() == [1, 64]
    assert np.abs(exported["st"]["resaved/query"] - exported["reference"]["full/query"]).max() < 1e-5


def test_exported_folder_is_a_moon_rl_folder(exported):
    embedder = MoonEmbedder.load(exported["work"] / "adapter", model_spec=_spec())
    vectors = embedder.encode([TEXTS[0]])
    assert np.abs(vectors - exported["reference"]["adapter/query"][:1]).max() < 1e-5


def test_not_a_model_folder(tmp_path):
    with pytest.raises(MoonError, match="not a moon-rl model folder"):
        export_sentence_transformers(tmp_path, tmp_path / "out")
    (tmp_path / "moon_rl.json").write_text(json.dumps({"weights": "full", "model_type": "qwen2_5_vl"}))
    with pytest.raises(MoonError, match="missing: model, processor"):
        export_sentence_transformers(tmp_path, tmp_path.parent / "out")


def test_generated_code_has_no_moon_rl_imports():
    code = generate_code()
    assert set(code) >= {"moon_st", "embedder", "heads", "taps"}
    for target, text in code.items():
        assert not _moon_rl_imports(text), target


def _moon_rl_imports(text: str) -> list[str]:
    nodes = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Import | ast.ImportFrom)]
    return [ast.unparse(n) for n in nodes if "moon_rl" in ast.unparse(n)]


def test_a_missing_model_folder_is_named_as_missing(tmp_path):
    from moon_rl.modeling.embedder import MoonEmbedder

    with pytest.raises(MoonError, match=r"nope: no such model folder"):
        MoonEmbedder.load(tmp_path / "nope")
