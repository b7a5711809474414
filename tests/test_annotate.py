"""`moon-rl annotate`: template traces, the teacher's contradiction filter and resume, the catalogue copy on disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
from PIL import Image

from moon_rl.data.annotate import (
    catalogue_vocabulary,
    contradicted,
    known_values,
    template_attribute_order,
    template_trace,
    template_traces,
    title_values,
    write_catalogue_copy,
)
from moon_rl.data.catalogue import load_catalogue
from moon_rl.data.chains import named_values
from moon_rl.data.records import Product
from moon_rl.errors import DataError, MoonError
from moon_rl.inference.annotate import annotate_with_teacher, annotate_with_template, extract_trace

#: the slow acceptance run: catalogue size and SFT steps (measured: see its docstring)
SLOW_PRODUCTS, SLOW_STEPS = 200, 150


def _png(colour: tuple[int, int, int]) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def raw_catalogue(tmp_path: Path) -> Path:
    """Products with attributes and no traces: a file image in a subfolder, an image as bytes (a data URI in JSONL),
    a product with nothing but a title; pairs with an inline image query; a gallery."""
    import base64

    folder = tmp_path / "raw"
    (folder / "photos").mkdir(parents=True)
    (folder / "photos" / "a.png").write_bytes(_png((200, 0, 0)))
    uri = "data:image/png;base64," + base64.b64encode(_png((0, 0, 200))).decode()
    products = [
        {"id": "a", "title": "red cotton shirt", "category": "shirt", "attributes": {"colour": "red", "material": "cotton"},
         "images": ["photos/a.png"]},
        {"id": "b", "title": "blue wool scarf", "category": "scarf", "attributes": {"colour": "blue", "material": "wool"},
         "images": [uri]},
        {"id": "c", "title": "a wool shirt in red", "attributes": {"fit": "slim"}},
        {"id": "d", "title": "mystery item"},
        {"id": "e", "title": "shirt", "category": "shirt", "attributes": {"colour": "navy blue"},
         "reasoning": "its own trace"},
    ]
    (folder / "products.jsonl").write_text("".join(json.dumps(p) + "\n" for p in products))
    pairs = [{"anchor": {"text": "red shirt", "image": "photos/a.png"}, "positive": "a", "negatives": ["c"]},
             {"anchor": "b", "positive": "b"}]
    (folder / "pairs_train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (folder / "gallery_train.txt").write_text("a\nb\nc\n")
    (folder / "catalogue.json").write_text(json.dumps({"note": "kept"}))
    return folder


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_template_order_puts_the_category_first_then_the_most_common_attributes(raw_catalogue):
    products = list(load_catalogue(raw_catalogue).products.values())
    # category: 3 products (a, b, e); colour: 3 (a, b, e); material 2 (a, b); fit 1
    assert template_attribute_order(products) == ["category", "colour", "material", "fit"]


def test_template_trace_names_known_values_and_fills_gaps_from_an_unambiguous_title():
    vocabulary = {"category": {"shirt": 2, "scarf": 1}, "colour": {"red": 1, "blue": 1, "navy blue": 1},
                  "material": {"cotton": 1, "wool": 1}}
    order = ["category", "colour", "material"]
    product = Product(id="c", title="a wool shirt in red", attributes={"colour": "blue"})
    # colour: the product's own value wins over the title's; category and material come from the title
    assert template_trace(product, order, vocabulary) == "category shirt. colour blue. material wool."
    # a title naming two values of one attribute says nothing about it; "navy blue" is one (longest) value
    assert title_values("red or navy blue shirt", vocabulary) == {"category": "shirt"}
    assert title_values("navy blue shirt", vocabulary) == {"category": "shirt", "colour": "navy blue"}
    assert template_trace(Product(id="d", title="mystery"), order, vocabulary) is None


def test_contradicted_flags_a_wrong_value_but_not_an_omission_or_the_right_one():
    vocabulary = {"colour": {"red": 1, "blue": 1}, "material": {"cotton": 1, "wool": 1}}
    known = {"colour": "red", "material": "cotton"}
    assert contradicted("colour blue. material cotton.", known, vocabulary) == ["colour"]
    assert contradicted("colour red.", known, vocabulary) == []  # material left out: no contradiction
    assert contradicted("red, or maybe blue", known, vocabulary) == []  # names the known value too
    assert contradicted("wool and blue", known, vocabulary) == ["colour", "material"]


def test_template_copy_carries_traces_and_leaves_the_source_untouched(raw_catalogue, tmp_path):
    before = _digest(raw_catalogue)
    out = tmp_path / "elsewhere" / "annotated"
    report = annotate_with_template(load_catalogue(raw_catalogue), out)
    assert _digest(raw_catalogue) == before
    assert (report.annotated, report.kept, report.no_values) == (3, 1, 1)  # a b c; e kept; d has nothing to say
    copy = load_catalogue(out, decode_images=True)
    source = load_catalogue(raw_catalogue)
    assert copy.products["a"].reasoning == "category shirt. colour red. material cotton."
    assert copy.products["c"].reasoning == "category shirt. colour red. material wool. fit slim."
    assert copy.products["d"].reasoning is None and copy.products["e"].reasoning == "its own trace"
    # every image decodes to the source's pixels: the relative path re-rooted, the bytes as a data URI
    for pid in ("a", "b"):
        assert copy.image(copy.products[pid]).tobytes() == source.image(source.products[pid]).tobytes()
    assert copy.products["b"].images[0].startswith("data:image/png;base64,")
    inline = copy.pairs["train"][0].anchor
    assert copy.image(inline.image).tobytes() == source.image(source.pairs["train"][0].anchor.image).tobytes()
    assert [p.model_dump() for p in copy.pairs["train"]][1:] == [p.model_dump() for p in source.pairs["train"]][1:]
    assert copy.pairs["train"][0].negatives == ["c"] and copy.galleries == source.galleries
    assert copy.manifest["note"] == "kept"
    assert copy.manifest["annotation"]["mode"] == "template"
    assert copy.manifest["annotation"]["order"] == ["category", "colour", "material", "fit"]
    # retrace replaces e's own trace
    again = annotate_with_template(load_catalogue(raw_catalogue), out, retrace=True, overwrite=True)
    assert again.annotated == 4 and load_catalogue(out).products["e"].reasoning == "category shirt. colour navy blue."


def test_the_copy_refuses_the_source_folder_and_an_existing_folder(raw_catalogue, tmp_path):
    catalogue = load_catalogue(raw_catalogue)
    with pytest.raises(DataError, match="source is never modified"):
        write_catalogue_copy(catalogue, raw_catalogue, command="annotate", manifest_entry=("annotation", {}),
                             overwrite=True)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match="already exists"):
        annotate_with_template(catalogue, out)
    with pytest.raises(DataError, match=r"attribute\(s\) \['size'\]"):
        annotate_with_template(catalogue, out, order=["colour", "size"], overwrite=True)


def test_template_traces_of_the_synthetic_catalogue_name_every_value_of_its_own_traces():
    catalogue = load_catalogue("builtin:synthetic")
    made = template_traces(catalogue, retrace=True)
    vocabulary = {name: dict.fromkeys(values, 1) for name, values in
                  ((n, {str(p.attributes[n]) for p in catalogue.products.values()}) for n in made.order)}
    assert made.order[0] == "category" and len(made.traces) == len(catalogue.products)
    for product in catalogue.products.values():
        named = named_values(made.traces[product.id], vocabulary)
        assert named == named_values(product.reasoning, vocabulary), product.id


def test_extract_trace_takes_the_think_block_and_drops_tags_and_control_characters():
    assert extract_trace("noise <think> colour red.\n pattern  dotted. </think> after") == "colour red. pattern dotted."
    assert extract_trace("colour red.</think>\x17") == "colour red."


class ScriptedTeacher:
    """A stand-in teacher: answers from a script per product id (one answer per attempt), records every request."""

    name = "scripted"
    max_images = 1

    def __init__(self, script: dict[str, list[str]], fail_on_call: int | None = None):
        self.script, self.asked, self.calls, self.fail_on_call = script, [], 0, fail_on_call

    def write(self, products, images, instruction, *, max_new_tokens, do_sample, temperature=0.8):
        self.calls += 1
        if self.fail_on_call == self.calls:
            raise RuntimeError("killed")
        answers = []
        for product in products:
            attempt = sum(1 for pid, _ in self.asked if pid == product.id)
            self.asked.append((product.id, do_sample))
            answers.append(self.script[product.id][min(attempt, len(self.script[product.id]) - 1)])
        return answers


SCRIPT = {
    "a": ["category shirt. colour blue.", "category shirt. colour red. material cotton."],  # 1 contradiction, then ok
    "b": ["category shirt.", "category shirt.", "category shirt."],  # always contradicts the category scarf: dropped
    "c": ["<think>colour red. fit slim.</think>"],  # right at once (c's category is unknown: any is fine)
    "d": [""],  # an empty answer is no trace: dropped after every attempt
}


def test_teacher_retries_contradictions_drops_the_hopeless_and_counts_them(raw_catalogue, tmp_path):
    teacher = ScriptedTeacher(SCRIPT)
    out = tmp_path / "teacher"
    report = annotate_with_teacher(load_catalogue(raw_catalogue), out, teacher, max_attempts=3, batch_size=2,
                                   show_progress=False)
    assert (report.annotated, report.regenerated, report.dropped, report.kept) == (2, 1, 2, 1)
    assert report.contradictions == {"colour": 1, "category": 3, "empty": 3}
    # the first attempt is greedy, the retries sample; nobody is asked after an accepted trace
    assert [s for pid, s in teacher.asked if pid == "a"] == [False, True]
    assert len([pid for pid, _ in teacher.asked if pid == "b"]) == 3
    copy = load_catalogue(out)
    assert copy.products["a"].reasoning == "category shirt. colour red. material cotton."
    assert copy.products["c"].reasoning == "colour red. fit slim."
    assert copy.products["b"].reasoning is None and copy.products["e"].reasoning == "its own trace"
    assert copy.manifest["annotation"]["dropped"] == 2


def test_teacher_resumes_after_a_crash_and_a_limit_without_asking_twice(raw_catalogue, tmp_path):
    catalogue, out = load_catalogue(raw_catalogue), tmp_path / "teacher"
    trial = annotate_with_teacher(catalogue, out, ScriptedTeacher(SCRIPT), batch_size=1, limit=1,
                                  show_progress=False)
    assert (trial.annotated, trial.pending) == (1, 3) and load_catalogue(out).products["a"].reasoning
    crashing = ScriptedTeacher(SCRIPT, fail_on_call=3)  # b's batch: attempt 1 and 2 are calls 1-2, then killed
    with pytest.raises(RuntimeError, match="killed"):
        annotate_with_teacher(catalogue, out, crashing, batch_size=1, show_progress=False)
    finishing = ScriptedTeacher(SCRIPT)
    report = annotate_with_teacher(catalogue, out, finishing, batch_size=1, show_progress=False)
    assert {pid for pid, _ in finishing.asked} == {"b", "c", "d"}  # a was finished by the trial run
    assert (report.resumed, report.annotated, report.dropped) == (1, 2, 2)
    # other settings on the same folder: refused, or started again with --overwrite
    with pytest.raises(DataError, match="max_attempts differ"):
        annotate_with_teacher(catalogue, out, ScriptedTeacher(SCRIPT), max_attempts=1, show_progress=False)
    fresh = ScriptedTeacher(SCRIPT)
    report = annotate_with_teacher(catalogue, out, fresh, max_attempts=1, overwrite=True, show_progress=False)
    assert (report.resumed, report.annotated) == (0, 1) and len(fresh.asked) == 4


def test_builtin_tiny_teacher_runs_end_to_end_and_resumes(raw_catalogue, tmp_path):
    """The real generation path (processor, chat template, batched left-padded generate) with a random tiny VLM."""
    from moon_rl.inference.annotate import Teacher
    from moon_rl.recipe.schema import ModelSpec

    teacher = Teacher("builtin:tiny-vl", ModelSpec(lora=None))
    catalogue, out = load_catalogue(raw_catalogue), tmp_path / "tiny"
    first = annotate_with_teacher(catalogue, out, teacher, batch_size=2, max_new_tokens=8, limit=2,
                                  show_progress=False)
    second = annotate_with_teacher(catalogue, out, teacher, batch_size=2, max_new_tokens=8, show_progress=False)
    assert first.pending == 2 and second.resumed == 2 and second.pending == 0
    assert second.annotated + second.dropped == 4 and second.kept == 1
    rows = [json.loads(line) for shard in sorted((out / ".annotate").glob("shard-*.jsonl"))
            for line in shard.read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == ["a", "b", "c", "d"]
    assert all(1 <= row["attempts"] <= 3 for row in rows)
    # the counts add up: every rejected attempt was counted once, by attribute (or as empty)
    rejected = sum(len(row["contradicted"]) for row in rows)
    assert sum(second.contradictions.values()) == rejected
    accepted = {row["id"]: row["reasoning"] for row in rows if row["reasoning"]}
    copy, vocabulary = load_catalogue(out), catalogue_vocabulary(catalogue.products.values())
    for pid, trace in accepted.items():
        assert copy.products[pid].reasoning == trace
        assert contradicted(trace, known_values(catalogue.products[pid]), vocabulary) == []


class FakeVLLM:
    """A stand-in `vllm` module: records what the teacher hands vLLM, answers with a scripted trace per prompt."""

    def __init__(self, answer):
        self.answer, self.calls, self.init = answer, [], {}
        fake = self

        class LLM:
            def __init__(self, **kwargs):
                fake.init = kwargs

            def generate(self, requests, params, use_tqdm=True):
                fake.calls.append((requests, params))
                return [NS(outputs=[NS(text=fake.answer(r))]) for r in requests]

        class SamplingParams:
            def __init__(self, **kwargs):
                self.__dict__.update(kwargs)

        self.LLM, self.SamplingParams = LLM, SamplingParams


def test_the_vllm_teacher_sends_the_transformers_prompts_and_images(raw_catalogue, tmp_path, monkeypatch):
    """No GPU here: a fake `vllm` checks what the vLLM teacher sends (the prompts `Teacher` builds, each product's
    images, the recipe's pixel limits, greedy then sampled) and that its answers go through the same filter."""
    import sys

    from moon_rl.inference import annotate as annotate_module
    from moon_rl.modeling import generation
    from moon_rl.recipe.schema import ModelSpec

    fake = FakeVLLM(lambda request: "<think>category shirt.</think>" if "red cotton shirt" in request["prompt"]
                    else "")
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(generation, "vllm_available", lambda: True)
    spec = ModelSpec(lora=None)
    assert isinstance(annotate_module.make_teacher("builtin:tiny-vl", spec), annotate_module.Teacher)  # no GPU: hf
    teacher = annotate_module.make_teacher("builtin:tiny-vl", spec, "vllm", seed=3)
    assert fake.init["limit_mm_per_prompt"] == {"image": 4} and fake.init["seed"] == 3
    assert fake.init["mm_processor_kwargs"] == {"min_pixels": spec.image_min_pixels, "max_pixels": spec.image_max_pixels}
    catalogue = load_catalogue(raw_catalogue)
    products = list(catalogue.products.values())
    images = [[catalogue.image(p, i) for i in range(len(p.images))] for p in products]
    assert teacher.write(products, images, "Describe it.", max_new_tokens=5, do_sample=False)[0] == \
        "<think>category shirt.</think>"
    requests, params = fake.calls[-1]
    assert [r["prompt"] for r in requests] == annotate_module.chat_prompts(teacher.processor, products, images,
                                                                          "Describe it.", 4)
    assert [len(r.get("multi_modal_data", {}).get("image", [])) for r in requests] == [min(len(i), 4) for i in images]
    assert (params.max_tokens, params.temperature) == (5, 0.0)
    teacher.write(products, images, "Describe it.", max_new_tokens=5, do_sample=True, temperature=0.7)
    assert fake.calls[-1][1].temperature == 0.7
    report = annotate_with_teacher(catalogue, tmp_path / "out", teacher, max_attempts=1, show_progress=False)
    assert report.annotated == 1 and report.dropped >= 1  # product a's answer passes; empty answers are dropped
    with pytest.raises(MoonError, match="must be auto, hf or vllm"):
        annotate_module.make_teacher("builtin:tiny-vl", spec, "tgi")


def test_cli_annotate_needs_one_source_and_writes_the_copy(raw_catalogue, tmp_path):
    from typer.testing import CliRunner

    from moon_rl.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\ndata: {{catalogue: {raw_catalogue}}}\n")
    runner = CliRunner()
    for args in ([], ["--template", "--teacher", "builtin:tiny-vl"]):
        result = runner.invoke(app, ["annotate", str(recipe), *args])
        assert result.exit_code == 2 and "exactly one of --template" in result.output
    result = runner.invoke(app, ["annotate", str(recipe), "--template", "--attributes", "colour, category"])
    out = tmp_path / "run" / "catalogue-annotated"
    assert result.exit_code == 0, result.output
    assert "3 of 5 products annotated (template)" in result.output and f"--set data.catalogue={out}" in result.output
    assert load_catalogue(out).products["a"].reasoning == "colour red. category shirt."
    again = runner.invoke(app, ["annotate", str(recipe), "--template"])
    assert again.exit_code == 2 and "already exists" in again.output


def test_sft_says_reason_mode_will_not_train_and_how_to_annotate(raw_catalogue, tmp_path):
    from moon_rl.training.sft import untraced_catalogue_advice

    with_values = untraced_catalogue_advice(load_catalogue(raw_catalogue))
    assert "reason mode will not be trained" in with_values and "annotate RECIPE --template" in with_values
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "products.jsonl").write_text('{"id": "x", "title": "thing"}\n')
    advice = untraced_catalogue_advice(load_catalogue(bare))
    assert "--teacher MODEL" in advice and "--template" not in advice


def test_sft_on_an_untraced_catalogue_logs_the_advice(raw_catalogue, tmp_path, caplog):
    import logging

    from moon_rl.recipe import load_recipe
    from moon_rl.training.sft import build_sft_trainer

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"model: {{lora: null}}\ndata: {{catalogue: {raw_catalogue}}}\n"
                           "sft: {bf16: false, use_cpu: true, report_to: none, max_steps: 1}\n")
    recipe = load_recipe(recipe_file, [f"output_dir={tmp_path / 'run'}"])
    with caplog.at_level(logging.WARNING, logger="moon_rl"):
        build_sft_trainer(recipe)
    assert any("reason mode will not be trained" in r.getMessage() and "--template" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    traced = tmp_path / "traced"
    annotate_with_template(load_catalogue(raw_catalogue), traced)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moon_rl"):
        build_sft_trainer(load_recipe(recipe_file, [f"output_dir={tmp_path / 'run2'}", f"data.catalogue={traced}"]))
    assert not any("reason mode will not be trained" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_template_traces_teach_an_untraced_catalogue_to_reason(tmp_path):
    """The acceptance run of `annotate --template`: a catalogue with attributes and no traces, annotated, then SFT.
    Reason mode must learn to write the traces (greedy chains of the held-out products name their category, material
    and brand far above chance: the template's clauses carry the values the title gives) and must end level with direct
    mode. The LM loss weighs more than the recipe's (contrastive weight 0.1, not 0.25), so that copying is learnt in
    150 steps instead of 200 (about 2 minutes). Measured (200 products): direct / reason text R@1 0.375 / 0.400, chains
    name category 1.00, material 1.00, brand 0.75 (chance 0.12-0.14). Without the traces (measured once, not rerun here:
    it doubled the test's time) the same recipe at 200 steps left reason mode far below direct (0.175 vs 0.425) and its
    chains named nothing (0.00-0.03), so neither bar is met by SFT alone."""
    from moon_rl.data.synthetic import SyntheticConfig, synthesize
    from moon_rl.evaluation.retrieval import evaluate_embedder
    from moon_rl.modeling.embedder import MoonEmbedder
    from moon_rl.recipe import load_recipe
    from moon_rl.training.sft import run_sft

    raw = tmp_path / "raw"
    synthesize(raw, SyntheticConfig(n_products=SLOW_PRODUCTS, seed=3, image_size=56))
    rows = [json.loads(line) for line in (raw / "products.jsonl").read_text().splitlines()]
    (raw / "products.jsonl").write_text("".join(json.dumps({k: v for k, v in row.items() if k != "reasoning"}) + "\n"
                                                for row in rows))
    traced = tmp_path / "traced"
    assert annotate_with_template(load_catalogue(raw), traced).annotated == len(rows)
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml", [
        f"output_dir={tmp_path / 'run'}", f"data.catalogue={traced}", f"sft.max_steps={SLOW_STEPS}",
        "sft.contrastive_weight=0.1", "sft.disable_tqdm=true", "sft.save_steps=100000", "sft.logging_steps=50"])
    result = evaluate_embedder(MoonEmbedder.load(run_sft(recipe)), load_catalogue(traced), "test",
                               ["direct", "reason"], [1], zero_shot=False)
    chains = result.chain_attributes
    for attribute in ("category", "material", "brand"):
        assert chains[attribute]["right"] >= chains[attribute]["chance"] + 0.4, (attribute, chains[attribute])
    direct, reason = (result.recall_at_1(mode, "text->product") for mode in ("direct", "reason"))
    assert reason >= direct - 0.05, result
