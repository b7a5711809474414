"""Export a moon-rl model folder as a sentence-transformers model that loads without moon-rl installed.

    SentenceTransformer("exported/", trust_remote_code=True).encode(["red shirt", image, {"text": ..., "image": ...}])

gives the vectors of `MoonEmbedder.encode(..., mode="direct")`. The folder holds full backbone weights (a LoRA adapter
is merged, so the folder does not depend on the base model's location), the processor, the heads and the code.

The code is not a hand-kept copy: it is generated here from moon-rl's own source files, so there is one definition
of the embedding. Whole modules (`heads`, `taps`, `compat`, ...) are copied; from heavier modules only the named
top-level definitions (or class methods) are taken, with the imports they use. Every `moon_rl` import is rewritten to
a relative one (`from moon_rl.modeling.heads import X` -> `from .heads import X`): transformers'
`get_class_from_dynamic_module` copies the files a module imports that way next to it. An import of a moon-rl module
that is not shipped fails the export, not the user's load.

The exported folder is still a moon-rl model folder (`moon_rl.json` with `weights: full`), so `MoonEmbedder.load`
reads it too.
"""

from __future__ import annotations

import ast
import json
import shutil
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from moon_rl.cache import atomic_dir
from moon_rl.errors import MoonError
from moon_rl.modeling.folder import HEADS_CONFIG, HEADS_WEIGHTS, MODEL_MANIFEST

#: The sentence-transformers module class; its file is shipped as `<ST_MODULE_FILE>.py`.
ST_MODULE_FILE = "moon_st"
ST_MODULE_CLASS = "MoonSentenceEmbedder"
#: What the embedder forward needs of `MoonEmbedder` (its generation, encode loop and artefact code stay behind).
EMBEDDER_PARTS = ("__init__", "device", "prepare", "embed_record", "forward")


@dataclass(frozen=True)
class Shipped:
    """One generated code file: `target`.py made from moon-rl module `source`.

    `names`: the top-level names to take (`"Class.method"` takes only those methods of a class); None: the whole file.
    """

    target: str
    source: str
    names: tuple[str, ...] | None = None


SHIPPED: tuple[Shipped, ...] = (
    Shipped(ST_MODULE_FILE, "moon_rl.inference.st_module"),
    Shipped("errors", "moon_rl.errors"),
    Shipped("prompts", "moon_rl.data.prompts"),
    Shipped("heads", "moon_rl.modeling.heads"),
    Shipped("taps", "moon_rl.modeling.taps"),
    Shipped("compat", "moon_rl.modeling.compat"),
    Shipped("folder", "moon_rl.modeling.folder"),
    Shipped("inputs", "moon_rl.modeling.inputs",
            ("EmbedItem", "PromptBatch", "fitted_size", "fit_images", "tokenize_prompts", "assemble")),
    Shipped("loading", "moon_rl.modeling.loading", ("load_processor",)),
    Shipped("embedder", "moon_rl.modeling.embedder", tuple(f"MoonEmbedder.{m}" for m in EMBEDDER_PARTS)),
)

README = """\
# {name}: moon-rl embedder (sentence-transformers export)

Exported by moon-rl {version} from `{source}` (base model `{base_model}`, {embed_dim}-d, `direct` mode).
It loads without moon-rl; the modelling code ships in this folder (generated from moon-rl's source), so
`trust_remote_code=True` is required. Needs `sentence-transformers>=6.2`, `transformers`, `torch`, `pillow`.

```python
from PIL import Image
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{name}", trust_remote_code=True)
queries = model.encode(["red striped cotton shirt", Image.open("shirt.jpg"),
                        {{"text": "like this but blue", "image": Image.open("shirt.jpg")}}])
products = model.encode_document([{{"text": "Title: Oxford shirt\\nDescription: blue cotton", "image": Image.open("p.jpg")}}])
scores = model.similarity(queries, products)  # cosine; vectors are L2-normalised
```

- `encode` / `encode_query`: a `str` is a text query, a PIL image an image query, `{{"text", "image"}}` both.
- `encode_document`: the same inputs embedded as catalogue products (moon-rl's product instruction); write a product's
  text as `Title: ...\\nDescription: ...`, as moon-rl does.
- Prompts (`prompt=`, `prompt_name=`) are not supported: the instructions are part of the trained model.
- `model_kwargs={{"dtype": "bfloat16"}}` loads the backbone in another dtype (default: the saved one).{matryoshka}

The folder is also a moon-rl model folder: `MoonEmbedder.load("{name}")` reads it (and adds `reason` mode).
"""


def export_sentence_transformers(model_dir: Path, out: Path, *, model_spec: Any = None) -> Path:
    """Write `out`, a sentence-transformers folder equivalent to the moon-rl model folder `model_dir` (direct mode).

    Args:
        model_dir: a folder written by `MoonEmbedder.save` (full weights or a LoRA adapter).
        out: the folder to write (replaced atomically if it exists).
        model_spec: the recipe's `model` section, used only to load the base model of an adapter folder
            (default: the recipe saved with the model).

    Returns:
        `out`.

    Raises:
        MoonError: `model_dir` is not a moon-rl model folder, or `out` is inside it.
    """
    model_dir, out = Path(model_dir), Path(out)
    manifest = read_manifest(model_dir)
    if out.resolve() == model_dir.resolve() or model_dir.resolve() in out.resolve().parents:
        raise MoonError(f"{out}: the export folder must not be {model_dir} or inside it")
    code = generate_code()
    with atomic_dir(out) as tmp:
        _write_backbone(model_dir, manifest, tmp / "model", model_spec)
        shutil.copytree(model_dir / "processor", tmp / "processor")
        for name in (HEADS_WEIGHTS, HEADS_CONFIG, "recipe.yaml"):
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        for target, text in code.items():
            (tmp / f"{target}.py").write_text(text)
        _write_configs(tmp, model_dir, manifest, out.name)
    return out


def read_manifest(model_dir: Path) -> dict[str, Any]:
    """`moon_rl.json` of a moon-rl model folder, after checking the files an export needs are there."""
    manifest_path = model_dir / MODEL_MANIFEST
    if not manifest_path.is_file():
        raise MoonError(f"{model_dir}: not a moon-rl model folder (no moon_rl.json); pass a folder written by "
                        "training or `MoonEmbedder.save`, e.g. runs/<name>/sft/final")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise MoonError(f"{manifest_path}: not valid JSON ({exc})") from exc
    weights = manifest.get("weights")
    if weights not in ("full", "adapter"):
        raise MoonError(f"{manifest_path}: 'weights' must be 'full' or 'adapter', got {weights!r}")
    needed = ["model" if weights == "full" else "adapter", "processor", HEADS_WEIGHTS, HEADS_CONFIG]
    missing = [name for name in needed if not (model_dir / name).exists()]
    if missing or not manifest.get("model_type"):
        raise MoonError(f"{model_dir}: incomplete moon-rl model folder (missing: {', '.join(missing) or 'model_type'})")
    return manifest


def _write_backbone(model_dir: Path, manifest: dict[str, Any], dest: Path, model_spec: Any) -> None:
    """Full weights into `dest`: copied as they are, or an adapter merged into its (unquantised) base model."""
    if manifest["weights"] == "full":
        shutil.copytree(model_dir / "model", dest)
        return
    from peft import PeftModel

    from moon_rl.modeling.loading import load_model, resolve_model_path

    if model_spec is None:
        from moon_rl.modeling.embedder import model_spec_for

        model_spec = model_spec_for(model_dir, manifest)
    # LoRA cannot be merged into 4/8-bit weights without loss: merge into the base in its plain dtype instead.
    spec = _without_quantization(model_spec)
    base = load_model(resolve_model_path(spec), spec)
    merged = PeftModel.from_pretrained(base, str(model_dir / "adapter")).merge_and_unload()
    merged.save_pretrained(dest)


def _without_quantization(spec: Any) -> Any:
    if getattr(spec, "quantization", None) is None:
        return spec
    if hasattr(spec, "model_copy"):  # the recipe's pydantic section
        return spec.model_copy(update={"quantization": None})
    import copy

    spec = copy.copy(spec)
    spec.quantization = None
    return spec


def _write_configs(folder: Path, model_dir: Path, manifest: dict[str, Any], name: str) -> None:
    """modules.json, the module and sentence-transformers configs, moon_rl.json (now full weights) and README."""
    import sentence_transformers
    import torch
    import transformers

    import moon_rl

    modules = [{"idx": 0, "name": "0", "path": "", "type": f"{ST_MODULE_FILE}.{ST_MODULE_CLASS}"}]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    st_config = {
        "model_type": "SentenceTransformer", "prompts": {"query": "", "document": ""}, "default_prompt_name": None,
        "similarity_fn_name": "cosine",
        "__version__": {"sentence_transformers": sentence_transformers.__version__,
                        "transformers": transformers.__version__, "pytorch": torch.__version__},
    }
    (folder / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2))
    module_config = {"model_type": manifest["model_type"], "readout_token": manifest.get("readout_token", "<|im_end|>"),
                     "max_images": manifest.get("max_images", 4)}
    (folder / "moon_st_config.json").write_text(json.dumps(module_config, indent=2))
    exported = {**manifest, "weights": "full", "exported_from": str(model_dir), "exported_by": moon_rl.__version__}
    (folder / MODEL_MANIFEST).write_text(json.dumps(exported, indent=2))
    heads_config = json.loads((model_dir / HEADS_CONFIG).read_text())
    embed_dim, dims = heads_config.get("embed_dim"), heads_config.get("matryoshka_dims") or []
    matryoshka = (f"\n- Trained at the sizes {sorted({embed_dim, *dims}, reverse=True)} (Matryoshka): "
                  f"`SentenceTransformer(..., truncate_dim={min(dims)})` keeps the first {min(dims)} values of each "
                  "vector (`similarity` is cosine, so no renormalising is needed).") if dims else ""
    (folder / "README.md").write_text(README.format(
        name=name, version=moon_rl.__version__,
        source=model_dir, base_model=manifest.get("base_model"), embed_dim=embed_dim, matryoshka=matryoshka,
    ))


# ---------------------------------------------------------------------------------------------- code generation
def generate_code(shipped: tuple[Shipped, ...] = SHIPPED) -> dict[str, str]:
    """Source text of every shipped file (target name -> text), checked to be importable as one flat package."""
    targets = {s.source: s.target for s in shipped}
    code = {}
    for item in shipped:
        path = _source_path(item.source)
        text = _rewrite_imports(path.read_text(), targets, path)
        body = text if item.names is None else _extract(text, item.names, path)
        code[item.target] = f"# Generated by moon-rl from {_relative(path)}; do not edit (export the model again).\n{body}"
    _check_bundle(code, ST_MODULE_FILE)
    return code


def _source_path(module: str) -> Path:
    spec = find_spec(module)
    if spec is None or spec.origin is None:
        raise MoonError(f"cannot export: moon-rl module {module} is missing")
    return Path(spec.origin)


def _relative(path: Path) -> str:
    parts = path.parts
    return "/".join(parts[parts.index("moon_rl"):]) if "moon_rl" in parts else path.name


def _rewrite_imports(text: str, targets: dict[str, str], path: Path) -> str:
    """`text` with each `from moon_rl.x import y` of a shipped module made relative.

    Other `moon_rl` imports are left: `_extract` drops unused top-level ones (and fails on used ones), and
    `_check_bundle` fails on any left in the shipped code.
    """
    lines = text.splitlines(keepends=True)
    edits = []
    for node in ast.walk(ast.parse(text)):
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("moon_rl")):
            continue
        names = ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names)
        if node.module in targets:
            new = f"from .{targets[node.module]} import {names}"
        elif all(f"{node.module}.{a.name}" in targets for a in node.names):  # `from moon_rl.modeling import compat`
            new = "from . import " + ", ".join(
                targets[f"{node.module}.{a.name}"] + ("" if a.asname is None else f" as {a.asname}") for a in node.names
            )
        else:
            continue
        edits.append((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset, new))
    for start, col, end, end_col, new in sorted(edits, reverse=True):
        lines[start - 1:end] = [lines[start - 1][:col] + new + lines[end - 1][end_col:]]
    return "".join(lines)


def _extract(text: str, names: tuple[str, ...], path: Path) -> str:
    """Docstring, the top-level imports the taken code uses, and the named definitions (or class methods) of `text`."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    top = {_def_name(node): node for node in tree.body if _def_name(node)}
    wanted: dict[str, list[str]] = {}
    for name in names:
        owner, _, method = name.partition(".")
        if owner not in top:
            raise MoonError(f"cannot export: {_relative(path)} has no top-level {owner!r} (update SHIPPED in st_export)")
        wanted.setdefault(owner, [])
        if method:
            wanted[owner].append(method)
    segments = [_class_subset(top[o], m, lines, path) if m else _segment(top[o], lines) for o, m in wanted.items()]
    used = {n.id for s in segments for n in ast.walk(ast.parse(s)) if isinstance(n, ast.Name)}
    imports = [_kept_import(node, used, path) for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    docstring = ast.get_docstring(tree, clean=False)
    head = f'"""{docstring}"""\n\n' if docstring else ""
    return head + "".join(i + "\n" for i in imports if i) + "\n\n" + "\n\n".join(segments)


def _def_name(node: ast.stmt) -> str | None:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id
    return None


def _segment(node: ast.stmt, lines: list[str]) -> str:
    """Source of a statement, decorators included."""
    return "".join(lines[_segment_start(node) - 1:node.end_lineno])


def _class_subset(node: ast.stmt, methods: list[str], lines: list[str], path: Path) -> str:
    """The class statement with only `methods` (and a docstring saying so)."""
    found = {m.name: m for m in node.body if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef)}
    missing = [m for m in methods if m not in found]
    if missing:
        raise MoonError(f"cannot export: {_relative(path)} {node.name} has no {missing} (update SHIPPED in st_export)")
    header = "".join(lines[_segment_start(node) - 1:node.body[0].lineno - 1])
    doc = f'    """The embedding part of moon-rl\'s `{node.name}` ({", ".join(methods)}); generated, see the file header."""\n'
    return header + doc + "\n" + "\n".join(_segment(found[m], lines) for m in methods)


def _segment_start(node: ast.stmt) -> int:
    return min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])


def _kept_import(node: ast.Import | ast.ImportFrom, used: set[str], path: Path) -> str | None:
    """A top-level import reduced to the names the taken code uses; None when it binds none of them."""
    if isinstance(node, ast.ImportFrom) and node.module == "__future__":
        return ast.unparse(node)
    aliases = [a for a in node.names if (a.asname or a.name.split(".")[0]) in used]
    if not aliases:
        return None
    if _imports_moon_rl(node):
        raise MoonError(f"cannot export: {_relative(path)}:{node.lineno} imports {[a.name for a in aliases]} from "
                        f"{node.module}, which is not shipped (add it to SHIPPED in st_export)")
    node = ast.ImportFrom(node.module, aliases, node.level) if isinstance(node, ast.ImportFrom) else ast.Import(aliases)
    return ast.unparse(node)


def _check_bundle(code: dict[str, str], entry: str) -> None:
    """Every relative import resolves to a shipped file and name, and transformers will copy every file `entry` needs.

    transformers finds the files to copy with a regex on `from .x import` lines only (not `from . import x`).
    """
    defined = {t: _top_level_names(ast.parse(text)) for t, text in code.items()}
    for target, text in code.items():
        for node in ast.walk(ast.parse(text)):
            if _imports_moon_rl(node):
                raise MoonError(f"cannot export: {target}.py:{node.lineno} imports a moon-rl module that is not "
                                f"shipped: {ast.unparse(node)!r} (add it to SHIPPED in st_export)")
    reached, todo = {entry}, [entry]
    while todo:
        target = todo.pop()
        for node in ast.walk(ast.parse(code[target])):
            if not (isinstance(node, ast.ImportFrom) and node.level == 1):
                continue
            if node.module is None:
                unknown = [a.name for a in node.names if a.name not in code]
                if unknown:
                    raise MoonError(f"cannot export: {target}.py imports {unknown}, which are not shipped")
                continue
            if node.module not in code:
                raise MoonError(f"cannot export: {target}.py imports .{node.module}, which is not shipped")
            absent = [a.name for a in node.names if a.name not in defined[node.module]]
            if absent:
                raise MoonError(f"cannot export: {target}.py imports {absent} from {node.module}.py, which lacks them "
                                "(add them to SHIPPED in st_export)")
            if node.module not in reached:
                reached.add(node.module)
                todo.append(node.module)
    unreached = sorted(set(code) - reached)
    if unreached:
        raise MoonError(f"cannot export: {unreached} would not be copied by transformers (no `from .x import` chain "
                        f"from {entry}.py)")


def _imports_moon_rl(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name.split(".")[0] == "moon_rl" for a in node.names)
    return isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "moon_rl"


def _top_level_names(tree: ast.Module) -> set[str]:
    names = {n for n in (_def_name(node) for node in tree.body) if n}
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            names |= {a.asname or a.name.split(".")[0] for a in node.names}
    return names
