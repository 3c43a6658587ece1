"""The run's options: checked once into a frozen object; precedence over a gate's own declaration."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pytest_unlearnatk.options import OptionError, RunOptions, parse_batch, parse_dtype, parse_shard

pytest_plugins = ["pytester"]


def test_raw_text_becomes_typed_checked_values(tmp_path):
    options = RunOptions.from_raw({"model": "toy:erased", "batch": "4", "shard": "2/3", "dtype": "BF16",
                                   "replay_only": True, "store": "my-store"}, root=tmp_path)
    assert (options.batch, options.shard, options.dtype, options.device) == (4, (2, 3), "bfloat16", "auto")
    assert options.replay_only and not options.no_store and options.budget is None
    assert options.store == str((Path.cwd() / "my-store").resolve())  # relative to where pytest runs
    assert RunOptions.from_raw({}, root=tmp_path).store == str(tmp_path.resolve() / ".unlearnatk")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.batch = 2  # type: ignore[misc]


@pytest.mark.parametrize(("raw", "names", "message"), [
    ({"batch": "0"}, ("batch",), "give a whole number of cases >= 1"),
    ({"shard": "3/2"}, ("shard",), "give I/N with 1 <= I <= N"),
    ({"device": "gpu"}, ("device",), "use auto, cpu, cuda or cuda:N"),
    ({"budget": "huge"}, ("budget",), "use one of reference, fast, smoke"),
    ({"no_store": True, "store_readonly": True}, ("no_store", "store_readonly"), "contradict each other"),
    ({"no_store": True, "shard": "1/2"}, ("shard", "no_store"), "shards meet in the store"),
    ({"budget": ""}, ("budget",), "is empty: give a value, or leave the option out"),  # was the default, unseen
    ({"report": " "}, ("report",), "is empty"),
    ({"no_store": True, "replay_only": True}, ("replay_only", "no_store"), "a replay-only run replays what the store holds"),
])
def test_a_wrong_value_names_its_option_and_the_fix(tmp_path, raw, names, message):
    with pytest.raises(OptionError, match=message) as caught:
        RunOptions.from_raw(raw, root=tmp_path)
    assert caught.value.names == names


def test_parsers_take_typed_values_from_python_too():
    assert parse_batch(None) is None and parse_batch("auto") is None and parse_batch(3) == 3
    assert parse_shard((1, 4)) == (1, 4) and parse_shard(None) is None
    assert parse_dtype("fp16") == "float16" and parse_dtype(None) == "auto"
    for bad in (True, 2.5, -1):
        with pytest.raises(ValueError):
            parse_batch(bad)
    with pytest.raises(ValueError):
        parse_shard((0, 2))


def test_the_runs_budget_and_batch_beat_the_gates_and_skip_attacks_without_budgets(tmp_path):
    run = RunOptions.from_raw({"budget": "smoke", "batch": "2"}, root=tmp_path)
    presets = {"reference": 0, "fast": 0, "smoke": 0}
    assert run.budget_for("fast", presets) == "smoke" and run.batch_for(8) == 2
    assert run.budget_for(None, {}) is None  # no_attack: no budget to override
    plain = RunOptions.from_raw({}, root=tmp_path)
    assert plain.budget_for("fast", presets) == "fast" and plain.budget_for(None, presets) is None
    assert plain.batch_for(8) == 8 and plain.batch_for(None) is None


def test_every_field_is_an_option_and_an_ini_key(pytester):
    """Adding a field to RunOptions is all it takes to add --unlearn-<field> and unlearn_<field>."""
    result = pytester.runpytest("--help")
    for field in dataclasses.fields(RunOptions):
        flag = "--unlearn-" + field.name.replace("_", "-")
        result.stdout.fnmatch_lines([f"*{flag}*"])
        result.stdout.fnmatch_lines([f"*unlearn_{field.name} *"])
    pytester.makeini("[pytest]\nunlearn_shard = 5/2\n")
    bad = pytester.runpytest()
    bad.stderr.fnmatch_lines(["*--unlearn-shard='5/2': give I/N with 1 <= I <= N*"])
    pytester.makeini("[pytest]\nunlearn_budget =\n")  # an empty ini value: not set
    empty = pytester.runpytest("--unlearn-budget=")  # an empty command-line value: a mistake, said as one
    assert empty.ret == pytest.ExitCode.USAGE_ERROR
    empty.stderr.fnmatch_lines(["*--unlearn-budget='': is empty: give a value, or leave the option out for its default*"])


@pytest.mark.parametrize(("keywords", "message"), [
    ({"shard": (3, 2)}, r"shard=\(3, 2\): give I/N with 1 <= I <= N"),
    ({"batch_size": 0}, "batch_size=0: give a whole number of cases >= 1"),
    ({"long_prompts": "drop"}, "long_prompts='drop'; use one of truncate, skip, error"),
    ({"attack": "no_attack", "n_tokens": 3}, "n_tokens is not a setting of this attack"),
    ({"budget": "huge"}, "budget is 'huge'; use one of reference, fast, smoke"),
])
def test_run_gate_checks_its_keywords_before_any_model_work(keywords, message):
    from pytest_unlearnatk import UnlearnAtkError, run_gate

    class Untouchable:  # any model access would fail the test
        def __getattr__(self, name):
            raise AssertionError(f"the model was used ({name}) before the keywords were checked")

    with pytest.raises(UnlearnAtkError, match=message):
        run_gate(Untouchable(), ["a prompt"], lambda images: [False] * len(images), **keywords)


@pytest.mark.parametrize(("keywords", "message"), [
    ({"model": "toy:erased"}, r"model='toy:erased' is not a loaded model: load it first, model=load_pipeline\('toy:erased'\)"),
    ({"model": None}, "model=None is not a loaded model"),
    ({"base": "toy:base"}, r"base='toy:base' is not a loaded model: load it first"),
    ({"store": "my-store"}, r"store='my-store' is not a Store: open it first, store=Store\('my-store'\)"),
    ({"render": {"stepz": 2}}, r"render=\{'stepz': 2\}: .*unexpected keyword argument 'stepz'"),
    ({"render": 25}, "render=25: give a RenderSettings"),
    ({"concept": 5}, "concept=5: give the concept's name as text"),
    ({"attack": None}, "attack=None: give an attack name"),
    ({"progress": "yes"}, "progress='yes': give True"),
    ({"on_case": 5}, "on_case=5: give a callable"),
    ({"image_dir": 5}, "image_dir=5: give a directory path"),
])
def test_run_gate_says_which_object_is_wrong_before_any_model_work(keywords, message):
    """Each was an AttributeError or TypeError from deep inside, some only after the model had run."""
    from pytest_unlearnatk import UnlearnAtkError, run_gate
    from pytest_unlearnatk.models import LazyModel

    arguments = {"model": LazyModel("toy:erased"), **keywords}  # a LazyModel loads nothing until it is used
    with pytest.raises(UnlearnAtkError, match=message):
        run_gate(arguments.pop("model"), ["a prompt"], lambda images: [False] * len(images), attack="no_attack"
                 if "attack" not in arguments else arguments.pop("attack"), **arguments)


def test_run_gate_takes_render_settings_as_a_mapping_too():
    from pytest_unlearnatk.gate import GateSettings
    from pytest_unlearnatk.render import RenderSettings

    settings = GateSettings.build(judge=lambda images: [False] * len(images), attack="no_attack", render={"steps": 2})
    assert settings.render == RenderSettings(steps=2)
