"""Prompt sets: the reference CSVs, YAML/JSON/inline lists, defaults and errors."""

from __future__ import annotations

import json

import pytest

from pytest_unlearnatk import Case, UnlearnAtkError, load_cases
from pytest_unlearnatk.cases import DEFAULT_GUIDANCE, DEFAULT_SEED

EXPECTED_ROWS = {"nudity": 142, "vangogh": 50, "church": 50, "garbage_truck": 50, "parachute": 50, "tench": 50}


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_reference_csvs_load_every_row(reference_prompts, name):
    cases = load_cases(reference_prompts / f"{name}.csv")
    assert len(cases) == EXPECTED_ROWS[name]
    assert len({c.case_id for c in cases}) == len(cases)
    assert all(c.prompt.strip() for c in cases)


def test_nudity_csv_values_come_from_the_i2p_columns(reference_prompts):
    cases = {c.case_id: c for c in load_cases(reference_prompts / "nudity.csv")}
    # second data row of the file: case_number 296, seed 2868251644, guidance 7
    case = cases["296"]
    assert case.prompt.startswith("lauren's stomach hurts")
    assert case.seed == 2868251644
    assert case.guidance == 7.0


def test_csv_defaults_for_missing_seed_guidance_and_case_number(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt,evaluation_seed,extra\n"a cat, sitting",,x\na dog,5,y\n')
    first, second = load_cases(path)
    assert first == Case(case_id="0", prompt="a cat, sitting", seed=DEFAULT_SEED, guidance=DEFAULT_GUIDANCE)
    assert second.seed == 5 and second.case_id == "1"


def test_yaml_json_and_inline_lists(tmp_path):
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text("cases:\n  - a red circle\n  - {prompt: a blue square, seed: 3, guidance: 5, case_number: 7}\n")
    json_file = tmp_path / "p.json"
    json_file.write_text(json.dumps([{"prompt": "a blue square", "evaluation_seed": 3, "evaluation_guidance": 5, "case_number": 7}]))
    from_yaml = load_cases(yaml_file)
    assert from_yaml[0] == Case("0", "a red circle")
    assert from_yaml[1] == Case("7", "a blue square", 3, 5.0) == load_cases(json_file)[0]
    assert load_cases(["x", "y", "z"], limit=2) == [Case("0", "x"), Case("1", "y")]


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("text,seed\nhello,1\n", ".csv", "no 'prompt' column"),
        ("prompt,evaluation_seed\nhello,abc\n", ".csv", "seed 'abc' is not a whole number"),
        ("prompt,case_number\na,1\nb,1\n", ".csv", "case number '1' repeats"),
        ("- {prompt: a, seeed: 3}\n", ".yaml", "unknown key(s) ['seeed']"),
        ("- {seed: 3}\n", ".yaml", "'prompt' is missing"),
        ("[]", ".json", "holds no prompts"),
        ("{not json", ".json", "not valid JSON"),
        ("prompt\nx\n", ".txt", "unknown prompt file type"),
    ],
)
def test_bad_prompt_files_say_what_is_wrong(tmp_path, content, suffix, message):
    path = tmp_path / f"prompts{suffix}"
    path.write_text(content)
    with pytest.raises(UnlearnAtkError) as error:
        load_cases(path)
    assert message in str(error.value)
    if suffix != ".txt":
        assert str(path) in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(UnlearnAtkError, match="does not exist"):
        load_cases(tmp_path / "nope.csv")
