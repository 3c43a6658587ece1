"""A battery of bad inputs and faults, each with the exact outcome a user relies on: a clear error
(naming the file, key or option and the fix), a warning and a recompute, or a correct verdict.
Never a traceback of ours, never a silently wrong result. docs/what-happens-when.md lists them.

Most rows need no model (prompt sets, gate declarations, options, judges' answers, store
records, paths); the last ones run the tiny pipeline (a NaN model, a judge that lies, a gate
whose every case is skipped, unwritable directories).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from pytest_unlearnatk import Case, Store, UnlearnAtkError, load_cases, load_pipeline, run_gate
from pytest_unlearnatk.images import safe_name
from pytest_unlearnatk.judges import get_judge, to_verdict
from pytest_unlearnatk.options import OptionError, RunOptions
from pytest_unlearnatk.results import CaseResult
from pytest_unlearnatk.spec import SpecError, parse_gate
from pytest_unlearnatk.store import StoreWarning

pytest_plugins = ["pytester"]

# --- prompt sets: one entry at a time --------------------------------------------------------

BAD_ENTRIES = [
    ({"prompt": "a", "seed": 1.7}, "seed 1.7 is not a whole number"),
    ({"prompt": "a", "seed": True}, "seed True is not a whole number"),
    ({"prompt": "a", "seed": False}, "seed False is not a whole number"),
    ({"prompt": "a", "seed": "1.7"}, "seed '1.7' is not a whole number"),
    ({"prompt": "a", "seed": "inf"}, "seed 'inf' is not a whole number"),
    ({"prompt": "a", "seed": math.inf}, "seed inf is not a whole number"),
    ({"prompt": "a", "seed": math.nan}, "seed nan is not a whole number"),
    ({"prompt": "a", "seed": 2**70}, "seed 1180591620717411303424 is not a whole number between 0 and 2**63 - 1"),
    ({"prompt": "a", "seed": -1}, "seed -1 is not a whole number"),
    ({"prompt": "a", "seed": "-3"}, "seed '-3' is not a whole number"),
    ({"prompt": "a", "seed": "abc"}, "seed 'abc' is not a whole number"),
    ({"prompt": "a", "seed": [1]}, "seed [1] is not a whole number"),
    ({"prompt": "a", "guidance": "nan"}, "guidance nan is not a finite number >= 0"),
    ({"prompt": "a", "guidance": "inf"}, "guidance inf is not a finite number >= 0"),
    ({"prompt": "a", "guidance": math.nan}, "guidance nan is not a finite number >= 0"),
    ({"prompt": "a", "guidance": -math.inf}, "guidance -inf is not a finite number >= 0"),
    ({"prompt": "a", "guidance": -1}, "guidance -1 is not a finite number >= 0"),
    ({"prompt": "a", "guidance": True}, "guidance True is not a finite number >= 0"),
    ({"prompt": "a", "guidance": "high"}, "guidance 'high' is not a number"),
    ({"prompt": "a", "guidance": [7.5]}, "guidance [7.5] is not a finite number >= 0"),
    ({"prompt": ""}, "'prompt' is missing or empty"),
    ({"prompt": "   "}, "'prompt' is missing or empty"),
    ({"prompt": 5}, "'prompt' is missing or empty"),
    ({"prompt": None}, "'prompt' is missing or empty"),
    ({"prompt": "a", "case_number": True}, "case number True must be a non-empty text or a whole number"),
    ({"prompt": "a", "case_number": ""}, "case number '' must be a non-empty text or a whole number"),
    ({"prompt": "a", "case_number": 1.5}, "case number 1.5 must be a non-empty text or a whole number"),
    ({"prompt": "a", "sed": 3}, "unknown key(s) ['sed']"),
    (42, "expected a prompt string or a mapping, got int"),
]


@pytest.mark.parametrize(("entry", "message"), BAD_ENTRIES)
def test_a_bad_prompt_entry_is_an_error_naming_the_entry(entry, message):
    with pytest.raises(UnlearnAtkError) as error:
        load_cases(["fine", entry])
    assert "prompt list, entry 1: " + message in str(error.value)


@pytest.mark.parametrize(("entry", "case"), [
    ({"prompt": "a", "seed": "42", "guidance": "7"}, Case("0", "a", 42, 7.0)),
    ({"prompt": "a", "evaluation_seed": 2868251644, "evaluation_guidance": 7.5}, Case("0", "a", 2868251644, 7.5)),
    ({"prompt": "a", "case_number": 7, "guidance": 0}, Case("7", "a", 0, 0.0)),
])
def test_good_entries_become_exactly_these_cases(entry, case):
    assert load_cases([entry]) == [case]


BAD_FILES = [
    (b"prompt\n\xff\xfe broken\n", ".csv", "not UTF-8 text (byte 7"),
    (b"text,seed\nhello,1\n", ".csv", "no 'prompt' column"),
    (b"", ".csv", "no 'prompt' column"),
    (b"prompt,evaluation_seed\nhello,1.5\n", ".csv", "line 2: seed '1.5' is not a whole number"),
    (b"prompt,evaluation_guidance\nhello,nan\n", ".csv", "line 2: guidance nan is not a finite number"),
    (b"prompt,case_number\na,1\nb,1\n", ".csv", "case number '1' repeats"),
    (b"prompt\n", ".csv", "holds no prompts"),
    (b"{a: [", ".yaml", "not valid YAML"),
    (b"just text", ".yaml", "expected a list of prompts"),
    (b"\xff\xfe\x00", ".yaml", "not UTF-8 text"),
    (b"{\"cases\": 5}", ".json", "expected a list of prompts"),
    (b"[1, 2", ".json", "not valid JSON"),
    (b"prompt\nx\n", ".txt", "unknown prompt file type"),
]


@pytest.mark.parametrize(("content", "suffix", "message"), BAD_FILES)
def test_a_bad_prompt_file_is_an_error_naming_it(tmp_path, content, suffix, message):
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(content)
    with pytest.raises(UnlearnAtkError) as error:
        load_cases(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_a_csv_with_a_byte_order_mark_reads_like_one_without(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffprompt,evaluation_seed\na church,4\n".encode("utf-8"))
    assert load_cases(path) == [Case("0", "a church", 4)]


# --- gate declarations (markers and YAML suites) -------------------------------------------

GOOD_GATE = {"concept": "circle", "prompts": ["a circle"], "max_asr": 0.2}
BAD_GATES = [
    ({"max_asr": math.nan}, "'max_asr' is nan; it is a fraction between 0 and 1"),
    ({"max_asr": math.inf}, "'max_asr' is inf; it is a fraction between 0 and 1"),
    ({"max_asr": -0.1}, "'max_asr' is -0.1; it is a fraction between 0 and 1"),
    ({"max_asr": 20}, "'max_asr' is 20; it is a fraction between 0 and 1 (write 0.2, not 20)"),
    ({"max_asr": "0.2"}, "'max_asr' is the text '0.2', not a number (quoted, or written like 2e-1"),
    ({"max_asr": True}, "'max_asr' must be a number between 0 and 1"),
    ({"max_asr": None}, "'max_asr' must be a number between 0 and 1"),
    ({"budget": ["smoke"]}, "'budget' is ['smoke']: give a preset name"),
    ({"budget": "huge"}, "'budget' is 'huge'; use one of reference, fast, smoke"),
    ({"budget": 3}, "'budget' is 3: give a preset name"),
    ({"render": {"steps": 2.5}}, "render steps is 2.5; it must be a whole number between 1 and 1000"),
    ({"render": {"steps": 0}}, "render steps is 0; it must be a whole number between 1 and 1000"),
    ({"render": {"steps": True}}, "render steps is True; it must be a whole number"),
    ({"render": {"steps": "5"}}, "render steps is '5'; it must be a whole number"),
    ({"render": {"height": 33}}, "render height is 33; it must be a multiple of 8"),
    ({"render": {"height": -8}}, "render height is -8; it must be a whole number between 8 and 4096"),
    ({"render": {"width": 0}}, "render width is 0; it must be a whole number between 8 and 4096"),
    ({"render": {"width": "32"}}, "render width is '32'; it must be a whole number"),
    ({"render": {"negative_prompt": 5}}, "render negative_prompt is 5; it must be text"),
    ({"render": {"scheduler": "ddim"}}, "render scheduler 'ddim'; use one of lms, pipeline"),
    ({"render": {"stepz": 5}}, "unknown 'render' key(s) ['stepz']"),
    ({"render": [20]}, "'render' must be a mapping like {steps: 25}"),
    ({"n_tokens": 100}, "UnlearnDiffAtk n_tokens is 100; it must be a whole number between 1 and 75"),
    ({"n_tokens": 0}, "'n_tokens' must be a positive whole number, got 0"),
    ({"n_tokens": 2.5}, "'n_tokens' must be a positive whole number, got 2.5"),
    ({"n_tokens": True}, "'n_tokens' must be a positive whole number, got True"),
    ({"attack": "no_attack", "n_tokens": 3}, "'n_tokens' is not a setting of this attack; its settings: none"),
    ({"attack": "no_attack", "budget": "fast"}, "'budget' is 'fast', but this attack has no budget presets"),
    ({"attack": "random", "n_tokens": 76}, "random n_tokens is 76; it must be a whole number between 1 and 75"),
    ({"check_text": "yes"}, "UnlearnDiffAtk check_text is 'yes'; it must be true or false"),
    ({"attack": "p4d-n", "check_text": True}, "'check_text' is not a setting of this attack; its settings: "),
    ({"candidates_per_check": 0}, "UnlearnDiffAtk candidates_per_check is 0; it must be a whole number"),
    ({"candidates_per_check": "4"}, "UnlearnDiffAtk candidates_per_check is '4'; it must be a whole number"),
    ({"budget": "fast", "candidates_per_check": 21},
     "UnlearnDiffAtk candidates_per_check is 21, more than its 20 steps_per_timestep; take at most one candidate per step"),
    ({"attack": "random", "candidates_per_check": 4}, "'candidates_per_check' is not a setting of this attack; its settings: "),
    ({"position_choices": 0}, "UnlearnDiffAtk position_choices is 0; it must be a whole number between 1 and 100"),
    ({"position_choices": 101}, "UnlearnDiffAtk position_choices is 101; it must be a whole number between 1 and 100"),
    ({"position_choices": 2.0}, "UnlearnDiffAtk position_choices is 2.0; it must be a whole number"),
    ({"attack": "random", "position_choices": 3}, "'position_choices' is not a setting of this attack; its settings: "),
    ({"limit": 0}, "'limit' must be a positive whole number, got 0"),
    ({"limit": -1}, "'limit' must be a positive whole number, got -1"),
    ({"limit": 1.5}, "'limit' must be a positive whole number, got 1.5"),
    ({"limit": True}, "'limit' must be a positive whole number, got True"),
    ({"batch": 0}, "'batch' is 0: give a whole number of cases >= 1"),
    ({"batch": -2}, "'batch' is -2: give a whole number of cases >= 1"),
    ({"batch": 2.5}, "'batch' is 2.5: give a whole number of cases >= 1"),
    ({"batch": "eight"}, "'batch' is 'eight': give a whole number of cases >= 1"),
    ({"batch": True}, "'batch' is True: give a whole number of cases >= 1"),
    ({"judge": "nudnet"}, "'judge' 'nudnet' is not a registered judge"),
    ({"judge": 5}, "'judge' must be a judge name, 'module:function', or a callable; got 5"),
    ({"judge": {"label": "church"}}, "'judge' {'label': 'church'} needs a 'name'"),
    ({"attack": "atk"}, "'attack': unknown attack 'atk'; registered attacks: concept-inversion, no_attack, p4d-k, p4d-n, random, ring-a-bell, unlearndiffatk"),
    ({"attack": 5}, "'attack' must be a registered name or 'module:Class', got 5"),
    ({"concept": 5}, "'concept' must be a string like 'nudity' or 'church', got 5"),
    ({"prompts": None}, "'prompts' is missing"),
    ({"prompts": []}, "'prompts' is an empty list"),
    ({"prompts": 5}, "'prompts' must be a file path or a list of prompts, got int"),
    ({"prompts": "missing.csv"}, "'prompts' file"),
    ({"prompts": "."}, "is a directory; give a .csv, .yaml or .json file in it"),
    ({"prompts": "toy:squares"}, "unknown prompt set 'toy:squares'; toy: has toy:circle"),
    ({"treshold": 0.2}, "unknown key(s) ['treshold']"),
    ({"judge": ""}, "'judge' is empty; give a judge name or 'module:function', or leave the key out"),  # was the default
    ({"judge": "os:sep"}, "'judge': judge os:sep is a str ('/'), not a function"),
    ({"judge": "builtins:divmod"}, "'judge': judge builtins:divmod"),  # no signature, or the wrong one: either way named
    ({"judge": "json:dumps"}, ""),  # one positional argument: a function that can be called as a judge passes here
    ({"attack": "os:system"}, "'attack': system is not an attack: it is a builtin_function_or_method, not a class"),
    ({"attack": "collections:OrderedDict"}, "OrderedDict is not an attack: it lacks name, config_class"),
    ({"max_asr": "nan"}, "'max_asr' must be a number between 0 and 1"),  # text of no finite number: no hint to write nan
    ({"max_asr": "2e-1"}, "'max_asr' is the text '2e-1', not a number (quoted, or written like 2e-1, which YAML reads as text); write it as a plain decimal: 0.2"),
]


@pytest.mark.parametrize(("change", "message"), BAD_GATES)
def test_a_bad_gate_declaration_fails_at_collection_naming_the_key(tmp_path, change, message):
    if not message:
        parse_gate({**GOOD_GATE, **change}, where="suite.yaml, gates[0]", base_dir=tmp_path, name="g")
        return
    with pytest.raises(SpecError) as error:
        parse_gate({**GOOD_GATE, **change}, where="suite.yaml, gates[0]", base_dir=tmp_path, name="g")
    assert str(error.value).startswith("suite.yaml, gates[0]: ") and message in str(error.value)


def test_a_good_declaration_takes_the_concepts_defaults(tmp_path):
    spec = parse_gate(GOOD_GATE, where="w", base_dir=tmp_path, name="g")
    assert spec.judge == "toy_circle" and spec.attack_settings == {"n_tokens": 5} and spec.batch is None
    assert parse_gate({**GOOD_GATE, "check_text": True}, where="w", base_dir=tmp_path,
                      name="g").attack_settings == {"n_tokens": 5, "check_text": True}
    assert parse_gate({**GOOD_GATE, "candidates_per_check": 4}, where="w", base_dir=tmp_path,
                      name="g").attack_settings == {"n_tokens": 5, "candidates_per_check": 4}


# --- run options ---------------------------------------------------------------------------

BAD_OPTIONS = [
    ({"batch": "0"}, "give a whole number of cases >= 1"),
    ({"batch": "-1"}, "give a whole number of cases >= 1"),
    ({"batch": "2.5"}, "give a whole number of cases >= 1"),
    ({"shard": "0/2"}, "give I/N with 1 <= I <= N"),
    ({"shard": "a/b"}, "give I/N with 1 <= I <= N"),
    ({"shard": "1"}, "give I/N with 1 <= I <= N"),
    ({"device": "gpu"}, "use auto, cpu, cuda or cuda:N"),
    ({"device": "cuda:x"}, "use auto, cpu, cuda or cuda:N"),
    ({"dtype": "float8"}, "use auto, float32, float16 or bfloat16"),
    ({"budget": "huge"}, "use one of reference, fast, smoke"),
    ({"baseline": "no-such-report"}, "holds no gates/ folder"),
]


@pytest.mark.parametrize(("raw", "message"), BAD_OPTIONS)
def test_a_bad_option_value_names_the_option(tmp_path, raw, message):
    with pytest.raises(OptionError, match=message) as error:
        RunOptions.from_raw(raw, root=tmp_path)
    assert error.value.names == tuple(raw)


# --- what judges return --------------------------------------------------------------------

BAD_VERDICTS = [
    ({"hit": "false"}, "'hit' must be True or False (a bool), not str"),
    ({"hit": 1}, "'hit' must be True or False (a bool), not int"),
    ({"hit": None}, "'hit' must be True or False (a bool), not NoneType"),
    (None, "a verdict must be a bool, or have a 'hit' flag"),
    ("yes", "a verdict must be a bool, or have a 'hit' flag"),
    (1, "a verdict must be a bool, or have a 'hit' flag"),
    ({"hit": True, "score": "high"}, "'score' must be a finite number"),
    ({"hit": True, "score": math.nan}, "'score' must be a finite number"),
    ({"hit": False, "score": math.inf}, "'score' must be a finite number"),
    ({"hit": False, "score": True}, "'score' must be a finite number"),
    ({"hit": True, "labels": 5}, "'labels' must be a mapping"),
]


@pytest.mark.parametrize(("answer", "message"), BAD_VERDICTS)
def test_a_judge_answer_that_is_not_a_clear_verdict_is_an_error(answer, message):
    judge = get_judge(lambda images: [answer for _ in images])
    with pytest.raises(UnlearnAtkError, match=message.replace("(", r"\(").replace(")", r"\)")):
        judge([object()])


@pytest.mark.parametrize(("answer", "message"), [
    (None, "returned None; it must return a list with one verdict per image"),
    ([], "returned 0 verdicts for 1 images"),
    ([True, False], "returned 2 verdicts for 1 images"),
    ("true", "returned 'true'; it must return a list"),
])
def test_a_judge_that_answers_the_wrong_number_of_times_is_an_error(answer, message):
    with pytest.raises(UnlearnAtkError, match=message):
        get_judge(lambda images: answer)([object()])


def test_a_judge_that_cannot_judge_is_refused_when_built_not_after_the_renders():
    with pytest.raises(UnlearnAtkError, match=r"judge \S*<lambda>\(\) cannot be called with one argument, the list of images"):
        get_judge(lambda: [True])
    with pytest.raises(UnlearnAtkError, match=r"judge \S*two\(images, threshold\) cannot be called with one argument"):
        def two(images, threshold):
            return [True] * len(images)
        get_judge(two)
    assert get_judge(lambda images, threshold=0.5: [True] * len(images))([object()])[0].hit


def test_a_baseline_that_is_this_runs_report_directory_is_refused(tmp_path):
    (tmp_path / "released" / "gates").mkdir(parents=True)
    with pytest.raises(OptionError, match="are the same directory") as error:
        RunOptions.from_raw({"baseline": str(tmp_path / "released"), "report": str(tmp_path / "released")}, root=tmp_path)
    assert error.value.names == ("report", "baseline")


@pytest.mark.parametrize("store", [None, "kept"])
def test_a_report_directory_that_is_the_store_is_refused(tmp_path, store):
    """The report's reset would remove the store's kept images (same folder, same file names)."""
    raw = {"report": str(tmp_path / (store or ".unlearnatk")), "store": store and str(tmp_path / store)}
    with pytest.raises(OptionError, match="are the same directory: the report's images/ would mix") as error:
        RunOptions.from_raw(raw, root=tmp_path)
    assert error.value.names == ("report", "store")


def test_a_base_that_is_a_weights_file_says_so(tiny_dir, tmp_path):
    import torch
    from safetensors.torch import save_file

    from pytest_unlearnatk import load_pipeline

    weights = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(UnlearnAtkError, match=r"the base .*unet.safetensors holds unet weights, diffusers layout, which "
                                              "goes over a base itself; a base is a pipeline directory, a hub id or an "
                                              "original single-file checkpoint"):
        load_pipeline(weights, base=weights)


def test_numpy_answers_are_real_verdicts():
    verdict = to_verdict({"hit": np.bool_(True), "score": np.float32(0.25)}, "j")
    assert verdict.hit is True and verdict.score == 0.25


# --- store records -------------------------------------------------------------------------

GOOD_RESULT = CaseResult(case=Case("0", "a"), attack="no_attack", hit=True, pre_attack_hit=True, hit_by="plain").to_dict()
BAD_RESULTS = [
    ({"hit": "no"}, "hit, pre_attack_hit and truncated must be true or false"),
    ({"hit": 0}, "hit, pre_attack_hit and truncated must be true or false"),
    ({"hit": False}, "contradict each other"),
    ({"hit_by": None}, "contradict each other"),
    ({"status": "pending"}, "status 'pending' is not a finished case's"),
    ({"adversarial_ids": [-1]}, "adversarial_ids must be a list of whole numbers >= 0"),
    ({"prompt_ids": ["a"]}, "prompt_ids must be a list of whole numbers >= 0"),
    ({"prompt_ids": [True]}, "prompt_ids must be a list of whole numbers >= 0"),
    ({"steps": "40"}, "steps must be a whole number >= 0"),
    ({"steps": -1}, "steps must be a whole number >= 0"),
    ({"steps": 2.5}, "steps must be a whole number >= 0"),
    ({"verdict": []}, "verdict, timings and images must be mappings"),
    ({"checks": [{"step": 1}]}, "missing"),
    ({"checks": [{"step": 20, "timestep": 50, "adversarial_ids": [1], "rendered": True, "hit": False, "score": 0.0,
                  "text": "yes"}]}, "each check's rendered, hit and text must be true or false"),
    ({"surprise": 1}, "unexpected keyword"),
]


@pytest.mark.parametrize(("change", "message"), BAD_RESULTS)
def test_an_edited_case_result_is_rejected_not_counted(change, message):
    with pytest.raises((ValueError, TypeError, KeyError), match=message):
        CaseResult.from_dict({**GOOD_RESULT, **change}, case=Case("0", "a"))


def _result_file(store: Store, key: str) -> Path:
    return store.directory / "results" / key[:2] / f"{key}.json"


KEY = "ab" * 32
BAD_RECORD_FILES = [
    (b"\x00\xff\x13 random", "could not be read"),
    (b"{\"format\": 1, ", "corrupt store file"),
    (b"[1, 2]", "not a format-1 store record"),
    (b"null", "not a format-1 store record"),
    (json.dumps({"format": 2, "key": KEY, "result": GOOD_RESULT}).encode(), "not a format-1 store record"),
    (json.dumps({"format": 1, "key": "other", "result": GOOD_RESULT}).encode(), "not the case result its name says"),
    (json.dumps({"format": 1, "key": KEY, "result": [1]}).encode(), "not the case result its name says"),
]


@pytest.mark.parametrize(("content", "message"), BAD_RECORD_FILES)
def test_a_bad_store_file_is_a_warning_and_nothing(tmp_path, content, message):
    store = Store(tmp_path)
    path = _result_file(store, KEY)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.warns(StoreWarning, match=message):
        assert store.get_result(KEY) is None


@pytest.mark.parametrize("prompt_record", [
    [1, 2], {"concept": "c"}, {"concept": "c", "case_prompt": "a", "seed": 0, "guidance": 7.5, "content_ids": "12",
                                "adversarial_ids": [], "text": "", "tokenizer": "t", "render": {}, "broke": "b",
                                "broke_source": "s", "judge": "j", "score": 0.5, "found_by": "f"},
])
def test_a_bad_adversarial_prompt_record_is_a_warning_and_skipped(tmp_path, prompt_record):
    store = Store(tmp_path)
    path = tmp_path / "prompts" / "c" / "x.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": 1, "kind": "adversarial_prompt", "key": "x", "prompt": prompt_record}))
    with pytest.warns(StoreWarning, match="not an adversarial-prompt record"):
        assert store.prompts_for("c", "a", 0, 7.5) == []


def test_a_signed_store_ignores_records_edited_or_written_without_the_key(tmp_path):
    signed = Store(tmp_path, key=b"ci-secret")
    signed.put_result(KEY, {"case": "a"}, GOOD_RESULT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert signed.get_result(KEY) == GOOD_RESULT  # intact: read without a warning
    path = _result_file(signed, KEY)
    record = json.loads(path.read_text())
    record["result"]["hit"] = False  # someone turns a FAIL into a PASS
    path.write_text(json.dumps(record))
    with pytest.warns(StoreWarning, match="a wrong signature for this store key"):
        assert signed.get_result(KEY) is None
    Store(tmp_path).put_result(KEY, {"case": "a"}, GOOD_RESULT)  # written by a run without the key
    with pytest.warns(StoreWarning, match="no signature for this store key"):
        assert signed.get_result(KEY) is None
    signed.put_result(KEY, {"case": "a"}, GOOD_RESULT)
    with pytest.warns(StoreWarning, match="a wrong signature"):
        assert Store(tmp_path, key=b"another key").get_result(KEY) is None


# --- paths built from names ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../../x", "/abs/x", "a/b", "..", ".", "", "a\\b", "x" * 300, "é", "a b"])
def test_names_from_user_input_never_leave_their_directory(tmp_path, name):
    file_name = safe_name(name, "case")
    assert "/" not in file_name and "\\" not in file_name and not file_name.startswith(".") and len(file_name) <= 120
    assert (tmp_path / file_name).resolve().parent == tmp_path.resolve()


def test_different_names_never_share_a_file():
    names = ["nudity v1", "nudity/v1", "nudity_v1", "nudity-v1", "../nudity_v1"]
    assert len({safe_name(name) for name in names}) == len(names)


# --- faults while a gate runs (tiny pipeline) ---------------------------------------------

def _render():
    from pytest_unlearnatk import RenderSettings

    return RenderSettings(steps=2)


def test_a_model_with_one_nan_weight_is_an_error_not_a_pass(tiny_dir, tmp_path):
    import torch

    from pytest_unlearnatk import load_pipeline
    from pytest_unlearnatk.render import NonFiniteError

    model = load_pipeline(tiny_dir)  # its own copy: the shared fixture stays intact
    with torch.no_grad():
        model.pipeline.unet.conv_out.bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model .* rendered an image with NaN or infinite pixels \(seed 0"):
        run_gate(model, ["a red circle"], lambda images: [False] * len(images), attack="no_attack", render=_render())


def test_a_judge_saying_false_as_text_stops_the_gate(tiny_model):
    with pytest.raises(UnlearnAtkError, match="'hit' must be True or False"):
        run_gate(tiny_model, ["a red circle"], lambda images: [{"hit": "false"}] * len(images), attack="no_attack",
                 render=_render())


def test_a_gate_whose_every_case_is_skipped_fails(tiny_model):
    from pytest_unlearnatk.report import GateRecord, failure_message

    long_prompt = " ".join(["word"] * 80)
    result = run_gate(tiny_model, [long_prompt], lambda images: [False] * len(images), attack="no_attack",
                      long_prompts="skip", render=_render())
    record = GateRecord.from_result("g", "c", "-", 0.2, result, 1.0)
    assert result.n == 0 and result.skipped == 1 and not record.passed
    assert "no case was counted (1 skipped), so there is no evidence the erasure holds" in failure_message(record, result)


def test_plain_prompt_strings_are_cases(tiny_model):
    result = run_gate(tiny_model, ["a prompt", "another"], lambda images: [False] * len(images), attack="no_attack",
                      render=_render())
    assert [c.case.case_id for c in result.cases] == ["0", "1"] and result.n == 2


@pytest.mark.parametrize("where", ["store", "image_dir"])  # the run_gate keyword, as the message says: pass image_dir=DIR
def test_an_unwritable_directory_names_its_setting_and_leaves_no_temp_file(tiny_model, tmp_path, where):
    from pytest_unlearnatk.errors import SettingProblem

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    target = blocker / "sub"
    keywords = {"store": Store(target)} if where == "store" else {"image_dir": target}
    with pytest.raises(SettingProblem) as error:
        run_gate(tiny_model, ["a"], lambda images: [False] * len(images), attack="no_attack", render=_render(), **keywords)
    assert error.value.name == where and str(blocker) in str(error.value) and f"pass {where}=DIR" in str(error.value)
    assert not list(tmp_path.rglob("*.tmp"))


def test_an_image_directory_problem_is_said_as_the_report_option_in_pytest():
    from pytest_unlearnatk.images import image_dir_problem
    from pytest_unlearnatk.suite import option_terms

    message = option_terms(image_dir_problem(Path("/r/images"), PermissionError(13, "Permission denied")))
    assert message == ("could not write images in /r/images (Permission denied): pass --unlearn-report=DIR, a writable "
                       "directory, or set unlearn_report in your pytest ini file")


def test_a_full_disk_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno

    from pytest_unlearnatk.errors import SettingProblem

    def full(self, data):
        Path.write_text(self, "half")  # the first bytes land, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(SettingProblem, match="No space left on device"):
        Store(tmp_path).put_result(KEY, {}, GOOD_RESULT)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


# --- the plugin end to end: gate ids, stale reports, a signed store -------------------------


SUITE = """
gates:
  - {name: circle, concept: circle, prompts: [a red circle, a blue square], attack: no_attack, max_asr: %s,
     judge: my_judges:%s, render: {steps: 2}}
"""
JUDGES = "def always(images):\n    return [True] * len(images)\n\ndef never(images):\n    return [False] * len(images)\n"


def test_two_suites_with_a_gate_of_the_same_name_keep_both_reports(pytester, tiny_dir):
    pytester.makepyfile(my_judges=JUDGES)
    pytester.syspathinsert()
    (pytester.path / "a").mkdir()
    (pytester.path / "b").mkdir()
    (pytester.path / "a" / "unlearn_one.yaml").write_text(SUITE % (0.5, "always"))
    (pytester.path / "b" / "unlearn_one.yaml").write_text(SUITE % (0.5, "never"))
    report = pytester.path / "report"
    (report / "gates").mkdir(parents=True)
    (report / "gates" / "stale-gate-from-last-week.json").write_text('{"record": {}, "result": {}}')
    (report / "gates" / "mine.txt").write_text("mine")  # a user's folder named gates/: theirs stays
    (report / "images").mkdir()
    (report / "images" / "photo.jpg").write_text("mine")
    (report / "images" / ("0" * 64 + ".png")).write_text("an image a run kept")
    (report / "notes.txt").write_text("mine")
    result = pytester.runpytest(f"--unlearn-model={tiny_dir}", f"--unlearn-report={report}", "--unlearn-no-store",
                                "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["a/unlearn_one.yaml::circle *FAIL*", "b/unlearn_one.yaml::circle *PASS*"])
    files = sorted(path.name for path in (report / "gates").glob("*.json"))
    assert len(files) == 2 and "stale-gate-from-last-week.json" not in files  # both gates, nothing stale
    assert not (report / "images" / ("0" * 64 + ".png")).exists()
    assert (report / "gates" / "mine.txt").read_text() == (report / "images" / "photo.jpg").read_text() == "mine"
    assert sorted(json.loads((report / "gates" / name).read_text())["record"]["asr"] for name in files) == [0.0, 1.0]
    assert (report / "notes.txt").read_text() == "mine"  # what we did not write stays
    shown = [name for name in files for case in json.loads((report / "gates" / name).read_text())["result"]["cases"]
             for name in case["images"].values()]
    assert len(shown) == 4 and all((report / "images" / name).is_file() for name in shown)


def test_with_a_store_key_an_edited_result_cannot_turn_fail_into_pass(pytester, tiny_dir, monkeypatch):
    pytester.makepyfile(my_judges=JUDGES)
    pytester.syspathinsert()
    pytester.makefile(".yaml", unlearn_gate=SUITE % (0.2, "always"))
    monkeypatch.setenv("UNLEARNATK_STORE_KEY", "ci-secret")
    args = [f"--unlearn-model={tiny_dir}", "--unlearn-store=store", "-p", "no:cacheprovider"]
    pytester.runpytest(*args).assert_outcomes(failed=1)

    def cheat():
        for path in (pytester.path / "store" / "results").rglob("*.json"):
            record = json.loads(path.read_text())
            record["result"].update(hit=False, pre_attack_hit=False, hit_by=None)
            path.write_text(json.dumps(record))

    cheat()
    again = pytester.runpytest(*args, "-W", "always::pytest_unlearnatk.store.StoreWarning")
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["*ASR 100.0% > max_asr 20.0%*"])
    again.stdout.fnmatch_lines(["*a wrong signature for this store key*"])
    cheat()
    monkeypatch.delenv("UNLEARNATK_STORE_KEY")
    pytester.runpytest(*args).assert_outcomes(passed=1)  # without a key the store is a cache you trust (docs/store.md)


def test_a_missing_model_path_says_so_first(pytester, tmp_path):
    pytester.makepyfile(my_judges=JUDGES)
    pytester.syspathinsert()
    pytester.makefile(".yaml", unlearn_gate=SUITE.replace("attack: no_attack, ", "") % (0.2, "always"))
    result = pytester.runpytest(f"--unlearn-model={tmp_path / 'no-such-model'}", "--unlearn-no-store", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines([f"*{tmp_path / 'no-such-model'}: no such file or directory*"])
    assert "needs target images" not in result.stdout.str() and "Traceback" not in result.stdout.str()


def test_a_report_directory_that_is_a_file_is_a_usage_error(pytester, tiny_dir):
    (pytester.path / "report").write_text("a file")
    result = pytester.runpytest(f"--unlearn-model={tiny_dir}", f"--unlearn-report={pytester.path / 'report'}")
    result.stderr.fnmatch_lines([("*could not write the report in *report (it is a file, not a directory): "
                                  "pass --unlearn-report=DIR, a writable directory*")])
    # one that cannot be created is found out at the start too, not after the gates ran
    result = pytester.runpytest(f"--unlearn-model={tiny_dir}", f"--unlearn-report={pytester.path / 'report' / 'inside'}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*could not write the report in *inside (*): pass --unlearn-report=DIR, a writable directory*"])


def test_a_store_that_cannot_be_written_fails_the_gate_before_any_render(pytester, tiny_dir):
    """Found when the gate starts, not when its first result is saved after the model's work; a run
    with no gate creates no store directory."""
    pytester.makepyfile(my_judges="from pathlib import Path\n\ndef spy(images):\n    Path('judged').write_text('yes')\n"
                                  "    return [False] * len(images)\n")
    pytester.syspathinsert()
    pytester.makefile(".yaml", unlearn_gate=SUITE % (0.5, "spy"))
    (pytester.path / "a-file").write_text("not a directory")
    result = pytester.runpytest(f"--unlearn-model={tiny_dir}", f"--unlearn-store={pytester.path / 'a-file' / 'store'}",
                                "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*could not write the store in *a-file?store (*): pass --unlearn-store=DIR, a writable directory*"])
    assert not (pytester.path / "judged").exists()
    pytester.makepyfile(test_plain="def test_nothing():\n    pass\n")
    pytester.runpytest("test_plain.py", f"--unlearn-store={pytester.path / 'unused'}").assert_outcomes(passed=1)
    assert not (pytester.path / "unused").exists()


def test_a_model_that_fails_to_load_is_tried_once_per_run(tmp_path):
    from pytest_unlearnatk import LazyModel

    (tmp_path / "broken").mkdir()
    model = LazyModel(str(tmp_path / "broken"), device="cpu")
    with pytest.raises(UnlearnAtkError, match="has no model_index.json"):
        model.load()
    with pytest.raises(UnlearnAtkError, match=r"could not be loaded \(see the first error about it in this run\)"):
        model.load()


def test_an_unwritable_target_cache_is_a_warning_not_a_failed_gate(tiny_model, base_model, tmp_path):
    from pytest_unlearnatk import TokenLayout
    from pytest_unlearnatk.targets import RenderedTargets

    ids = TokenLayout.from_pipeline(base_model.pipeline).sequence([320, 736])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    targets = RenderedTargets(base_model, _render(), directory=blocker / "targets")
    with pytest.warns(UserWarning, match="target image cache .* could not be written"):
        image = targets(Case("0", "a red circle"), ids)
    assert image.size == (32, 32)


def test_a_model_index_without_its_class_name_says_which_entry_is_missing(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(UnlearnAtkError, match="its model_index.json has no '_class_name' entry; it must be the one "
                                              "save_pretrained wrote"):
        load_pipeline(str(tmp_path))
