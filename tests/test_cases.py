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
    path.write_text('prompt,extra\n"a cat, sitting",x\na dog,y\n')  # no seed, guidance or case number column
    first, second = load_cases(path)
    assert first == Case(case_id="0", prompt="a cat, sitting", seed=DEFAULT_SEED, guidance=DEFAULT_GUIDANCE)
    assert second.seed == DEFAULT_SEED and second.case_id == "1"


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
        ("- {prompt: a, seed: 3, seed: 4}\n", ".yaml", "the key 'seed' appears twice"),
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


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("prompt,evaluation_seed\na,1\nb,\n", "prompts.csv, line 3: the 'evaluation_seed' cell is empty; fill it in, or "
                                              "remove the column to give every case the default (seed 0)"),
        ("prompt,evaluation_guidance\na, \n", "line 2: the 'evaluation_guidance' cell is empty"),
        ("prompt,evaluation_seed,evaluation_seed\na,1,2\n", "the column 'evaluation_seed' appears more than once"),
        ("prompt,seed,evaluation_seed\na,1,2\n", "the columns ['seed', 'evaluation_seed'] give the same seed; keep one"),
        ('prompt,evaluation_seed\n"a circle,1\nb,2\n', "not a valid CSV file (unexpected end of data); a quoted cell must end "
                                                      "with its quote"),  # was one prompt: the rest of the file
    ],
)
def test_a_csv_cell_or_column_that_would_be_read_silently_wrong_is_an_error(tmp_path, content, message):
    """An empty seed cell used to become seed 0, and of two seed columns the last won, unseen."""
    path = tmp_path / "prompts.csv"
    path.write_text(content)
    with pytest.raises(UnlearnAtkError) as error:
        load_cases(path)
    assert message in str(error.value)


def test_a_misspelt_csv_column_is_warned_about_and_other_columns_are_left_alone(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,evalution_seed,categories,Unnamed: 0\na,3,sexual,0\n")
    with pytest.warns(UserWarning, match=r"the column 'evalution_seed' is not read \(did you mean 'evaluation_seed'\?\)"
                                         r"; the cases take the default seed 0") as caught:
        assert load_cases(path) == [Case("0", "a")]
    assert len(caught) == 1  # categories, Unnamed: 0: the I2P schema's other columns, not warned about


@pytest.mark.parametrize(
    ("source", "limit", "message"),
    [
        (None, None, "prompts: got a NoneType; give a prompt file"),
        (5, None, "prompts: got a int; give a prompt file"),
        ({"prompt": "a"}, None, "prompts: got a dict"),  # its keys would have been read as prompts
        ("", None, "the prompt source is empty"),
        (["a"], "2", "limit='2': must be a whole number of cases >= 1"),
        (["a"], 1.5, "limit=1.5: must be a whole number"),
        (["a"], True, "limit=True: must be a whole number"),
    ],
)
def test_load_cases_says_what_is_wrong_with_its_arguments(source, limit, message):
    with pytest.raises(UnlearnAtkError) as error:
        load_cases(source, limit=limit)
    assert message in str(error.value)


def test_a_directory_or_a_callable_returning_none_is_named_as_such(tmp_path, monkeypatch):
    with pytest.raises(UnlearnAtkError, match="is a directory; give a .csv, .yaml or .json file in it"):
        load_cases(tmp_path)
    (tmp_path / "my_prompt_sets.py").write_text("def nothing():\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UnlearnAtkError, match="prompt set 'my_prompt_sets:nothing' returned None; it must return a file path"):
        load_cases("my_prompt_sets:nothing")
