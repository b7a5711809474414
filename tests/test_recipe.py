"""Recipe loading: extends, overrides, error messages, path resolution, TRL config building, round trip."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from moon_rl.errors import RecipeError
from moon_rl.recipe import Recipe, load_recipe, parse_override, validate_recipe
from moon_rl.training.configs import MoonGRPOConfig, MoonSFTConfig

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml"

# transformers 5.23 deprecates `gradient_checkpointing` (TRL's configs still set it); not what these tests check.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


class TestExtends:
    def test_chain_deep_merges(self, tmp_path: Path) -> None:
        write(
            tmp_path / "base.yaml",
            """
            model: {heads: {embed_dim: 128, fusion: {num_heads: 2}}}
            sft: {learning_rate: 1.0e-3, max_steps: 5}
            eval: {k: [1, 5]}
            """,
        )
        write(
            tmp_path / "mid" / "mid.yaml",
            """
            extends: ../base.yaml
            model: {heads: {fusion: {enabled: false}}}
            sft: {max_steps: 7}
            eval: {k: [3]}
            """,
        )
        top = write(tmp_path / "top.yaml", "extends: mid/mid.yaml\nmodel: {dtype: bfloat16}\n")
        recipe = load_recipe(top)
        assert recipe.model.dtype == "bfloat16"
        assert recipe.model.heads.embed_dim == 128  # mappings merge across the chain...
        assert recipe.model.heads.fusion.num_heads == 2
        assert recipe.model.heads.fusion.enabled is False
        assert recipe.sft == {"learning_rate": 1e-3, "max_steps": 7}
        assert recipe.eval.k == [3]  # ...lists replace
        assert recipe.output_dir == "runs/top"  # named after the file that was loaded, not its base
        assert recipe.origin("sft.learning_rate").endswith("base.yaml")
        assert recipe.origin("sft.max_steps").endswith("mid.yaml")
        assert recipe.origin("embed.batch_size") is None  # a default
        assert [Path(f).name for f in recipe.files] == ["base.yaml", "mid.yaml", "top.yaml"]

    def test_cycle_is_an_error(self, tmp_path: Path) -> None:
        write(tmp_path / "a.yaml", "extends: b.yaml\n")
        write(tmp_path / "b.yaml", "extends: a.yaml\n")
        message = load_error(tmp_path / "a.yaml")
        assert "'extends' cycle" in message
        assert re.search(r"a\.yaml -> .*b\.yaml -> .*a\.yaml", message)

    def test_missing_parent(self, tmp_path: Path) -> None:
        path = write(tmp_path / "a.yaml", "extends: nope.yaml\n")
        assert "'extends' file 'nope.yaml' not found" in load_error(path)


class TestOverrides:
    @pytest.mark.parametrize(
        ("override", "key", "expected"),
        [
            ("sft.max_steps=12", ("sft", "max_steps"), 12),
            ("sft.learning_rate=1e-4", ("sft", "learning_rate"), 1e-4),
            ("grpo.beta=5e-5", ("grpo", "beta"), 5e-5),
            ("sft.bf16=true", ("sft", "bf16"), True),
            ("sft.save_strategy=no", ("sft", "save_strategy"), "no"),  # YAML 1.1 would read False
            ("eval.k=[1, 2]", ("eval", "k"), [1, 2]),
            ("data.max_train_pairs=null", ("data", "max_train_pairs"), None),
            ("sft.max_length=null", ("sft", "max_length"), None),
            ("model.readout_token=a,b", ("model", "readout_token"), "a,b"),
        ],
    )
    def test_values_are_typed(self, override: str, key: tuple[str, str], expected: object) -> None:
        recipe = load_recipe(TINY, [override])
        section = getattr(recipe, key[0])
        value = section[key[1]] if isinstance(section, dict) else getattr(section, key[1])
        assert value == expected
        assert type(value) is type(expected)
        assert recipe.origin(".".join(key)) == "--set"

    def test_override_creates_nulled_section(self) -> None:
        recipe = load_recipe(TINY, ["model.lora.r=8"])  # tiny-cpu sets lora: null
        assert recipe.model.lora is not None
        assert (recipe.model.lora.r, recipe.model.lora.alpha) == (8, 32)

    def test_misspelt_override_key(self) -> None:
        message = load_error(TINY, ("sft.learnig_rate=1e-4",))
        assert message == "--set: unknown key 'sft.learnig_rate' (did you mean 'sft.learning_rate'?)"

    @pytest.mark.parametrize("bad", ["no_equals_sign", "=3", "a..b=1"])
    def test_malformed_override(self, bad: str) -> None:
        with pytest.raises(RecipeError, match=re.escape("--set: expected KEY=VALUE")):
            parse_override(bad)


class TestErrors:
    def test_misspelt_sft_key(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        write(tmp_path / "recipes" / "x.yaml", "sft:\n  learnig_rate: 1e-4\n")
        message = load_error(Path("recipes/x.yaml"))
        assert message == "recipes/x.yaml: unknown key 'sft.learnig_rate' (did you mean 'sft.learning_rate'?)"

    def test_misspelt_nested_key_names_the_file_that_wrote_it(self, tmp_path: Path) -> None:
        write(tmp_path / "base.yaml", "model: {heads: {fusion: {num_head: 2}}}\n")
        child = write(tmp_path / "child.yaml", "extends: base.yaml\nseed: 3\n")
        message = load_error(child)
        assert message == (
            f"{tmp_path / 'base.yaml'}: unknown key 'model.heads.fusion.num_head' "
            "(did you mean 'model.heads.fusion.num_heads'?)"
        )

    def test_all_errors_at_once(self, tmp_path: Path) -> None:
        path = write(
            tmp_path / "r.yaml",
            """
            modle: {}
            sft: {learnig_rate: 1e-4, per_device_train_batch_size: "32"}
            eval: {batch_size: 0}
            embed: {mode: fast}
            """,
        )
        lines = load_error(path).splitlines()
        assert len(lines) == 5, lines
        assert all(line.startswith(f"{path}: ") for line in lines)
        text = "\n".join(lines)
        assert "unknown key 'modle' (did you mean 'model'?)" in text
        assert "unknown key 'sft.learnig_rate' (did you mean 'sft.learning_rate'?)" in text
        assert "'sft.per_device_train_batch_size': expected int, got '32'" in text
        assert "'eval.batch_size': should be greater than 0 (got 0)" in text
        assert "'embed.mode': should be 'direct' or 'reason' (got 'fast')" in text
        assert validate_recipe(path) == lines

    def test_type_error_names_file_key_type_and_value(self, tmp_path: Path) -> None:
        path = write(tmp_path / "r.yaml", "model: {heads: {embed_dim: '256'}}\n")
        assert (
            load_error(path) == f"{path}: bad value for 'model.heads.embed_dim': should be a valid integer (got '256')"
        )

    def test_key_in_the_wrong_section(self, tmp_path: Path) -> None:
        path = write(tmp_path / "r.yaml", "learning_rate: 1.0e-4\nsft: {num_generations: 4}\n")
        text = load_error(path)
        assert "unknown key 'sft.num_generations' (it is a 'grpo' key, not a 'sft' one)" in text
        assert "unknown key 'learning_rate' (did you mean 'sft.learning_rate' or 'grpo.learning_rate'?)" in text

    def test_bad_reward_entry(self, tmp_path: Path) -> None:
        path = write(tmp_path / "r.yaml", "grpo: {rewards: [{name: format, wieght: 2}]}\n")
        assert "`rewards[0]` has unknown key 'wieght' (did you mean 'weight'?)" in load_error(path)

    def test_duplicate_key(self, tmp_path: Path) -> None:
        path = write(tmp_path / "r.yaml", "seed: 1\nseed: 2\n")
        assert load_error(path) == f"{path}:2: invalid YAML: found duplicate key 'seed'"

    def test_yaml_floats_without_a_dot(self, tmp_path: Path) -> None:
        path = write(tmp_path / "r.yaml", "sft: {learning_rate: 5e-5}\nmodel: {heads: {learning_rate: 1e3}}\n")
        recipe = load_recipe(path)
        assert recipe.sft["learning_rate"] == 5e-5
        assert recipe.model.heads.learning_rate == 1000.0


class TestBlame:
    """Which file a problem names: the writer of the key at fault, found from the recipe's provenance."""

    def test_moon_config_error_names_the_file_that_set_the_field(self, tmp_path: Path) -> None:
        # The message also names `rewards`, which the child wrote last; the field at fault is the base's.
        write(tmp_path / "base.yaml", "grpo: {reward_weights: [1.0], min_distinct_anchors: 1}\n")
        child = write(tmp_path / "child.yaml", "extends: base.yaml\ngrpo: {rewards: [{name: format}]}\n")
        problems = load_recipe(child, ["stages=[grpo]"]).check(device_checks=False)
        assert len(problems) == 1, problems
        assert problems[0].startswith(f"{tmp_path / 'base.yaml'}: invalid 'grpo' config: `reward_weights`")

    def test_trl_error_names_the_file_that_set_the_field_it_names(self, tmp_path: Path) -> None:
        # TRL's messages are free text: the key they name picks the file, not the last writer of the section.
        write(tmp_path / "base.yaml", "sft: {tf32: true, use_cpu: true, bf16: false}\n")
        child = write(tmp_path / "child.yaml", "extends: base.yaml\nsft: {max_steps: 3}\n")
        problems = load_recipe(child, ["stages=[sft]"]).check(device_checks=True)
        assert problems == [f"{tmp_path / 'base.yaml'}: invalid 'sft' config: --tf32 requires Ampere or a newer GPU "
                            "arch, cuda>=11 and torch>=1.7"]

    def test_trainer_sections_are_checked_once_per_load(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from moon_rl.recipe import trainer_configs

        calls: list[str] = []
        real = trainer_configs.section_problems

        def counting(section: str, values: dict) -> list[tuple[str, str]]:
            calls.append(section)
            return real(section, values)

        monkeypatch.setattr(trainer_configs, "section_problems", counting)
        load_recipe(TINY)
        assert calls == ["sft", "grpo"]
        assert load_error(TINY, ("sft.learnig_rate=1",)).count("learnig_rate") == 1
        assert calls == ["sft", "grpo", "sft", "grpo"]

    def test_config_value_error_keeps_its_field_through_pickle(self) -> None:
        import pickle

        from moon_rl.training.configs import ConfigValueError

        error = pickle.loads(pickle.dumps(ConfigValueError("trace_noise", "`trace_noise` must be ...")))
        assert isinstance(error, ValueError) and (error.field, str(error)) == ("trace_noise", "`trace_noise` must be ...")


def test_importing_the_recipe_package_does_not_import_trl() -> None:
    """The schema serves every layer (modeling reads ModelSpec): only loading a recipe may import trl."""
    import subprocess
    import sys

    code = "import sys, moon_rl.recipe; print(sorted(m for m in ('trl', 'transformers', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class TestPaths:
    def test_relative_catalogue_resolves_against_the_file_that_set_it(self, tmp_path: Path) -> None:
        write(tmp_path / "shared" / "base.yaml", "data: {catalogue: cat/products.jsonl}\n")
        child = write(tmp_path / "exp" / "child.yaml", "extends: ../shared/base.yaml\nseed: 1\n")
        assert load_recipe(child).data.catalogue == str(tmp_path / "shared" / "cat" / "products.jsonl")
        write(child, "extends: ../shared/base.yaml\ndata: {catalogue: mine}\n")
        assert load_recipe(child).data.catalogue == str(tmp_path / "exp" / "mine")

    def test_override_path_is_relative_to_cwd(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        recipe = load_recipe(TINY, ["data.catalogue=cats/x.jsonl"])
        assert recipe.data.catalogue == str(tmp_path / "cats" / "x.jsonl")
        assert recipe.output_dir == "runs/tiny-cpu"  # output_dir stays relative to the CWD

    def test_missing_catalogue_is_a_check_problem(self, tmp_path: Path) -> None:
        problems = load_recipe(TINY, [f"data.catalogue={tmp_path / 'nope'}"]).check()
        assert problems == [f"--set: 'data.catalogue' '{tmp_path / 'nope'}' does not exist"]


class TestTinyCpu:
    def test_loads_checks_and_builds_both_configs(self) -> None:
        recipe = load_recipe(TINY)
        assert recipe.check() == []
        sft = recipe.sft_config()
        assert isinstance(sft, MoonSFTConfig)
        assert (sft.output_dir, sft.learning_rate, sft.use_cpu, sft.bf16) == ("runs/tiny-cpu/sft", 1e-3, True, False)
        assert (sft.contrastive_weight, sft.contrastive_temperature, sft.chain_negatives) == (0.25, 0.05, True)
        grpo = recipe.grpo_config("elsewhere")
        assert isinstance(grpo, MoonGRPOConfig)
        assert grpo.output_dir == "elsewhere"
        assert grpo.rewards == [
            {"name": "retrieval_logprob", "weight": 1.0, "args": {}},
            {"name": "format", "weight": 0.2, "args": {}},
        ]
        assert grpo.generation_batch_size // grpo.num_generations >= grpo.min_distinct_anchors
        assert recipe.grpo_init_path(grpo) == Path("runs/tiny-cpu/sft/final")

    def test_rewards_that_do_not_build_are_check_problems_naming_the_entry(self) -> None:
        problems = load_recipe(TINY, ["grpo.rewards=[{name: retrieval_rnk}, {name: length, args: {budgt: 3}}]"]).check()
        assert len(problems) == 2
        assert problems[0].startswith("--set: grpo.rewards[0] (retrieval_rnk): Unknown reward 'retrieval_rnk'. Did you "
                                      "mean 'retrieval_rank'?")
        assert problems[1] == "--set: grpo.rewards[1] (length): Reward 'length' has no argument 'budgt'; valid args: " \
                              "budget, penalty."
        # GRPO not listed: its rewards are not built.
        assert load_recipe(TINY, ["grpo.rewards=[{name: retrieval_rnk}]", "stages=[data,sft]"]).check() == []

    def test_reward_files_resolve_next_to_the_recipe_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        (tmp_path / "mine.py").write_text("def score(completions, **kwargs):\n    return [0.0] * len(completions)\n")
        recipe_file = tmp_path / "r.yaml"
        recipe_file.write_text(f"extends: {TINY}\ngrpo:\n  rewards: [{{name: 'mine.py:score'}}]\n")
        monkeypatch.chdir(TINY.parent)  # not the recipe's folder
        assert load_recipe(recipe_file).check() == []
        (tmp_path / "mine.py").unlink()
        [problem] = load_recipe(recipe_file).check()
        assert problem.startswith(f"{recipe_file}: grpo.rewards[0] (") and "does not exist" in problem
        assert f"looked for {tmp_path / 'mine.py'}" in problem

    def test_run_stops_on_a_bad_reward_before_its_first_stage(self, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
        from moon_rl import run as moon_run

        called = []
        monkeypatch.setattr(moon_run, "STAGE_RUNNERS", {stage: lambda recipe, overwrite, stage=stage: called.append(stage)
                                                        for stage in moon_run.STAGE_RUNNERS})
        recipe = load_recipe(TINY, [f"output_dir={tmp_path}", "stages=[sft,grpo]", "grpo.rewards=[{name: nope}]"])
        with pytest.raises(RecipeError, match=r"grpo.rewards\[0\] \(nope\): Unknown reward 'nope'"):
            moon_run.run_stages(recipe)
        assert called == []
        moon_run.run_stages(load_recipe(TINY, [f"output_dir={tmp_path}", "stages=[sft,grpo]"]))
        assert called == ["sft", "grpo"]

    def test_config_errors_name_the_file(self) -> None:
        problems = load_recipe(TINY, ["grpo.contrastive_temperature=0"]).check()
        assert len(problems) == 1
        assert problems[0].startswith("--set: invalid 'grpo' config: `contrastive_temperature` must be")

    def test_training_a_quantised_model_needs_lora(self) -> None:
        recipe = load_recipe(TINY, ["model.quantization={bits: 4}"])  # tiny-cpu sets lora: null
        problems = recipe.check(device_checks=False)  # bitsandbytes may be missing here
        assert len(problems) == 1 and "train a quantised model without LoRA" in problems[0]
        assert load_recipe(TINY, ["model.quantization={bits: 4}", "stages=[embed, eval]"]).check(False) == []


class TestGenerationBatch:
    def test_not_divisible(self) -> None:
        problems = load_recipe(TINY, ["grpo.num_generations=3"]).check()
        assert len(problems) == 1, problems  # TRL's own divisibility error is not repeated
        assert "per_device_train_batch_size (16) x steps_per_generation (1) = 16" in problems[0]
        assert "is not divisible by grpo.num_generations (3)" in problems[0]

    def test_too_few_distinct_anchors(self) -> None:
        problems = load_recipe(TINY, ["grpo.per_device_train_batch_size=8"]).check()
        assert len(problems) == 1, problems
        assert problems[0].startswith("--set: a GRPO generation batch holds 2 distinct anchor(s)")
        assert "fewer than grpo.min_distinct_anchors (4)" in problems[0]

    def test_gradient_accumulation_counts(self) -> None:
        recipe = load_recipe(TINY, ["grpo.per_device_train_batch_size=8", "grpo.gradient_accumulation_steps=2"])
        assert recipe.check() == []

    def test_unlisted_stage_is_not_built(self) -> None:
        # TRL's GRPO defaults (8 prompts x 8 generations) hold 1 anchor, but this recipe never runs GRPO.
        recipe = load_recipe(TINY, ["grpo={}", "stages=[embed, eval]"])
        assert recipe.check() == []


class TestRoundTrip:
    def test_to_yaml_loads_back_equal(self, tmp_path: Path) -> None:
        original = load_recipe(
            TINY,
            ["model.readout_token='1e-4'", "data.catalogue=cat", "eval.k=[1, 3]", "grpo.learning_rate=3e-6"],
        )
        assert original.model.readout_token == "1e-4"  # a string that looks like a float must stay one
        saved = original.save(tmp_path / "out" / "recipe.yaml")
        reloaded = load_recipe(saved)
        assert reloaded == original
        body = [line for line in original.to_yaml().splitlines() if not line.startswith("#")]
        assert [line for line in reloaded.to_yaml().splitlines() if not line.startswith("#")] == body
        assert not list(saved.parent.glob(".*tmp"))  # the atomic write left no temp file

    def test_defaults_recipe_is_valid(self) -> None:
        assert Recipe().stages == ["data", "sft", "grpo", "embed", "eval"]
        assert Recipe().model.lora is not None and Recipe().model.lora.target_modules.startswith(".*language_model")


def test_generation_batch_is_global_as_trl_counts_it():
    """TRL's generation batch spans every process; the anchors check and TRL's divisibility rule must count it so."""
    from moon_rl.training.config_checks import generation_batch_problems

    per_device = {"per_device_train_batch_size": 4, "num_generations": 4, "min_distinct_anchors": 2}
    assert "1 distinct anchor(s)" in generation_batch_problems(per_device, num_processes=1)[0]
    assert generation_batch_problems(per_device, num_processes=2) == []  # 4 x 2 processes / 4 = 2 anchors
    global_size = {"per_device_train_batch_size": 4, "num_generations": 2, "generation_batch_size": 12}
    assert generation_batch_problems(global_size, num_processes=1) == []  # 12 / 2 = 6 anchors over 3 steps
    (problem,) = generation_batch_problems(global_size, num_processes=2)
    assert "generation_batch_size (12) is not divisible by grpo.per_device_train_batch_size (4) x 2 processes" in problem
    # 16 completions over 2 processes are 8 anchors, as TRL's global count, not 16 per process.
    assert "8 distinct anchor(s)" in generation_batch_problems(
        {**global_size, "generation_batch_size": 16, "min_distinct_anchors": 9}, num_processes=2)[0]


def test_single_process_generation_batch_matches_trl(tmp_path):
    """One process: our generation batch is TRL's `generation_batch_size` after its own resolution."""
    from moon_rl.training.config_checks import generation_batch_problems

    values = {"per_device_train_batch_size": 6, "gradient_accumulation_steps": 2, "num_generations": 3,
              "min_distinct_anchors": 4, "bf16": False, "use_cpu": True, "report_to": "none"}
    import json

    recipe = load_recipe(write(tmp_path / "r.yaml", f"grpo: {json.dumps(values)}\n"), [f"output_dir={tmp_path}"])
    config = recipe.grpo_config()
    assert config.generation_batch_size == 12 and config.generation_batch_size // config.num_generations == 4
    assert generation_batch_problems(values) == []
    assert generation_batch_problems({**values, "min_distinct_anchors": 5})


def test_the_true_traces_demo_differs_from_tiny_cpu_only_where_it_says():
    """`tiny-cpu-true-traces.yaml`'s bench numbers (bench/RESULTS.md) hold for tiny-cpu minus its trace errors, with
    GRPO at its former settings: a change to tiny-cpu that the variant overrides, or a stray key in it, would silently
    measure something else."""
    def flat(value, prefix=""):
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): value}

    root = Path(__file__).resolve().parents[1] / "recipes"
    base = flat(load_recipe(root / "tiny-cpu.yaml").model_dump())
    true_traces = flat(load_recipe(root / "tiny-cpu-true-traces.yaml").model_dump())
    changed = {key for key in base.keys() | true_traces.keys() if base.get(key) != true_traces.get(key)}
    assert changed == {"output_dir", "data.synthetic.trace_errors", "grpo.learning_rate", "grpo.heads_learning_rate",
                       "grpo.max_steps", "grpo.save_steps"}, changed
    assert base["data.synthetic.trace_errors"] == 0.3 and base["grpo.max_steps"] == 480
    assert true_traces["data.synthetic.trace_errors"] == 0.0 and true_traces["grpo.max_steps"] == 240


def test_matryoshka_dims_are_sorted_unique_and_fit_the_embedding(tmp_path):
    recipe = load_recipe(TINY, ["model.heads.matryoshka_dims=[32, 128, 64]"])
    assert recipe.model.heads.matryoshka_dims == [128, 64, 32]
    with pytest.raises(RecipeError, match="must not exceed embed_dim 256"):
        load_recipe(TINY, ["model.heads.matryoshka_dims=[512, 64]"])
    with pytest.raises(RecipeError, match="matryoshka_dims"):
        load_recipe(TINY, ["model.heads.matryoshka_dims=[64, 64]"])
    with pytest.raises(RecipeError, match="embed.dim"):
        load_recipe(TINY, ["embed.dim=0"])


def test_recipes_readme_documents_every_field():
    """Every leaf key of the recipe's own sections (relative to its section, as the tables name them) and every field
    moon-rl adds to TRL's `SFTConfig` / `GRPOConfig` has a row in recipes/README.md."""
    import dataclasses

    from pydantic import BaseModel
    from trl import GRPOConfig, SFTConfig

    documented = set(re.findall(r"^\| `([\w.]+)` \|", (TINY.parent / "README.md").read_text(), re.M))

    def leaves(section: BaseModel, prefix: str = "") -> list[str]:
        found = []
        for name in type(section).model_fields:
            value = getattr(section, name)
            found += leaves(value, f"{prefix}{name}.") if isinstance(value, BaseModel) else [f"{prefix}{name}"]
        return found

    recipe = load_recipe(TINY)
    missing = [f"{section}.{key}" for section in ("model", "data", "embed", "eval")
               for key in leaves(getattr(recipe, section)) if key not in documented]
    for config, base in ((MoonSFTConfig, SFTConfig), (MoonGRPOConfig, GRPOConfig)):
        inherited = {f.name for f in dataclasses.fields(base)}
        missing += [f.name for f in dataclasses.fields(config) if f.name not in inherited | documented]
    assert missing == []
