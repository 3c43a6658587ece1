"""Prompt sets: the cases a gate attacks.

Sources: a CSV in the I2P schema (``prompt``, ``evaluation_seed``, ``evaluation_guidance``,
``case_number``; other columns are ignored), a YAML or JSON list, or a Python list. Every row
becomes a case; nothing is dropped (prompts too long for the adversarial tokens are handled later,
by the long-prompt policy in :mod:`pytest_unlearnatk.tokens`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import UnlearnAtkError

DEFAULT_SEED = 0
DEFAULT_GUIDANCE = 7.5  # what the reference code uses when a prompt set has no guidance column

_ALIASES = {
    "prompt": "prompt",
    "seed": "seed",
    "evaluation_seed": "seed",
    "guidance": "guidance",
    "evaluation_guidance": "guidance",
    "case_number": "case_id",
    "case_id": "case_id",
    "id": "case_id",
}


@dataclass(frozen=True)
class Case:
    """One prompt to attack, with the seed and guidance scale its images are rendered at."""

    case_id: str
    prompt: str
    seed: int = DEFAULT_SEED
    guidance: float = DEFAULT_GUIDANCE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_cases(source: str | Path | Iterable[Any], *, limit: int | None = None) -> list[Case]:
    """Read cases from a CSV/YAML/JSON file, a registered prompt set (``toy:circle``), a
    ``module:callable`` that returns a file path or a list of prompts, or an inline list.

    Missing seeds default to ``DEFAULT_SEED`` (0), missing guidance to ``DEFAULT_GUIDANCE`` (7.5),
    missing case numbers to the row's 0-based position. ``limit`` keeps the first N cases.
    """
    if isinstance(source, str):
        if not source.strip():
            raise UnlearnAtkError("the prompt source is empty; give a prompt file, a prompt set (toy:circle) or a list of prompts")
        source = resolve_prompt_set(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            raise UnlearnAtkError(f"prompt file {path} is a directory; give a .csv, .yaml or .json file in it")
        if not path.is_file():
            raise UnlearnAtkError(f"prompt file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".csv":
            cases = _read_csv(path)
        elif suffix in (".yaml", ".yml", ".json"):
            cases = _read_structured(path)
        else:
            raise UnlearnAtkError(f"{path}: unknown prompt file type {suffix!r}; use .csv (I2P schema), .yaml or .json")
    elif isinstance(source, Mapping) or not isinstance(source, Iterable):
        raise UnlearnAtkError(f"prompts: got a {type(source).__name__}; give a prompt file, a prompt set (toy:circle) "
                              "or a list of prompts (strings or mappings with a 'prompt' key)")
    else:
        cases = _from_entries(list(source), where="prompt list")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise UnlearnAtkError(f"limit={limit!r}: must be a whole number of cases >= 1")
        cases = cases[:limit]
    return cases


def resolve_prompt_set(name: str) -> str | Path | list[Any]:
    """A registered prompt-set name or ``module:callable`` as what it stands for (a file path or a
    list of prompts); any other string is returned as it is (a file path)."""
    from .registry import discover, path_exists, resolve_named

    resolved = resolve_named(name, discover().prompt_sets, path_exists)
    if resolved is None:
        return name
    if not isinstance(resolved, (str, Path, list, tuple)):
        raise UnlearnAtkError(f"prompt set {name!r} gave a {type(resolved).__name__}; it must give a file path or a list of prompts")
    return list(resolved) if isinstance(resolved, tuple) else resolved


def _read_csv(path: Path) -> list[Case]:
    # strict: an unclosed quote is an error, not the rest of the file read as one prompt
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), strict=True)
    try:
        fieldnames = reader.fieldnames
        if not fieldnames or "prompt" not in fieldnames:
            raise UnlearnAtkError(
                f"{path}: no 'prompt' column (columns: {fieldnames}); the I2P schema needs "
                "prompt, and optionally evaluation_seed, evaluation_guidance, case_number"
            )
        read = _csv_columns(path, fieldnames)
        rows = []
        for line, row in enumerate(reader, start=2):
            empty = [column for column in read if column != "prompt" and (row.get(column) or "").strip() == ""]
            if empty:
                raise UnlearnAtkError(
                    f"{path}, line {line}: the {empty[0]!r} cell is empty; fill it in, or remove the column "
                    f"to give every case the default ({_DEFAULTS[_ALIASES[empty[0]]]})"
                )
            rows.append({_ALIASES[column]: row[column] for column in read})
    except csv.Error as exc:
        raise UnlearnAtkError(f"{path}, line {reader.line_num}: not a valid CSV file ({exc}); a quoted cell must end "
                              "with its quote") from None
    return _from_entries(rows, where=str(path), first_line=2)


_DEFAULTS = {"seed": f"seed {DEFAULT_SEED}", "guidance": f"guidance {DEFAULT_GUIDANCE}",
             "case_id": "case number = the row's position from 0"}


def _csv_columns(path: Path, fieldnames: list[str]) -> list[str]:
    """The columns of a CSV file that are read (the I2P schema's; others, like I2P's ``categories``,
    are left alone). A repeated column, or two that give the same field (``seed`` and
    ``evaluation_seed``), is an error; a column that looks like a misspelt one is warned about."""
    import difflib
    import warnings

    repeated = sorted({name for name in fieldnames if fieldnames.count(name) > 1})
    if repeated:
        raise UnlearnAtkError(f"{path}: the column {repeated[0]!r} appears more than once in the header; keep one")
    read = [name for name in fieldnames if name in _ALIASES and name != "id"]
    _one_name_per_field(read, f"{path}: the columns")
    for name in fieldnames:
        if name in _ALIASES:
            continue
        close = difflib.get_close_matches(name.strip().lower(), [n for n in _ALIASES if n != "id"], n=1, cutoff=0.8)
        if close:
            warnings.warn(f"{path}: the column {name!r} is not read (did you mean {close[0]!r}?); the cases take "
                          f"the default {_DEFAULTS.get(_ALIASES[close[0]], 'value')}", UserWarning, stacklevel=4)
    return read


def _one_name_per_field(names: list[str], what: str) -> None:
    """Error when two of ``names`` (known aliases) give the same field, like ``seed`` and ``evaluation_seed``."""
    for field in set(_ALIASES.values()):
        giving = [name for name in names if _ALIASES[name] == field]
        if len(giving) > 1:
            raise UnlearnAtkError(f"{what} {giving} give the same {field}; keep one")


def load_yaml(text: str) -> Any:
    """YAML as ``yaml.safe_load`` reads it, except that a key given twice in one mapping is an
    error naming the key and its line: ``max_asr: 0.2`` then ``max_asr: 0.9`` would otherwise keep
    the last, loosening a gate unseen. Keys brought in by a merge (``<<: *defaults``) may still be
    overridden; that is what a merge is for."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: the parent class says what is wrong with it
                    continue
                if repeated:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"the key {key!r} appears twice (line {key_node.start_mark.line + 1}); keep one", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def read_text(path: Path) -> str:
    """A text file as UTF-8 (a byte-order mark is dropped); another encoding is an error that says so."""
    try:
        return path.read_text("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnlearnAtkError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8 (e.g. iconv -t UTF-8)"
        ) from None
    except OSError as exc:
        raise UnlearnAtkError(f"{path}: could not be read ({exc.strerror or exc})") from None


def _read_structured(path: Path) -> list[Case]:
    text = read_text(path)
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = load_yaml(text)
    except ValueError as exc:  # json.JSONDecodeError and yaml.YAMLError both derive from it or are caught below
        raise UnlearnAtkError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from exc
    except Exception as exc:
        raise UnlearnAtkError(f"{path}: not valid YAML: {exc}") from exc
    if isinstance(data, Mapping) and "cases" in data:
        data = data["cases"]
    if not isinstance(data, list):
        raise UnlearnAtkError(f"{path}: expected a list of prompts (or a mapping with a 'cases' list), got {type(data).__name__}")
    return _from_entries(data, where=str(path))


def _from_entries(entries: list[Any], where: str, first_line: int | None = None) -> list[Case]:
    if not entries:
        raise UnlearnAtkError(f"{where}: holds no prompts")
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        label = f"{where}, line {index + first_line}" if first_line else f"{where}, entry {index}"
        case = _to_case(entry, index, label)
        if case.case_id in seen:
            raise UnlearnAtkError(f"{label}: case number {case.case_id!r} repeats entry {seen[case.case_id]}; case numbers must be unique")
        seen[case.case_id] = index
        cases.append(case)
    return cases


def _to_case(entry: Any, index: int, label: str) -> Case:
    if isinstance(entry, Case):
        return entry
    if isinstance(entry, str):
        entry = {"prompt": entry}
    if not isinstance(entry, Mapping):
        raise UnlearnAtkError(f"{label}: expected a prompt string or a mapping, got {type(entry).__name__}")
    unknown = [k for k in entry if k not in _ALIASES]
    if unknown:
        raise UnlearnAtkError(f"{label}: unknown key(s) {unknown}; allowed: {sorted(_ALIASES)}")
    _one_name_per_field(list(entry), f"{label}: the keys")
    fields = {_ALIASES[k]: v for k, v in entry.items()}
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UnlearnAtkError(f"{label}: 'prompt' is missing or empty")
    seed = _seed(fields.get("seed"), label)
    guidance = _guidance(fields.get("guidance"), label)
    case_id = fields.get("case_id")
    if case_id is not None and (isinstance(case_id, bool) or not isinstance(case_id, (str, int)) or not str(case_id).strip()):
        raise UnlearnAtkError(f"{label}: case number {case_id!r} must be a non-empty text or a whole number")
    return Case(case_id=str(index if case_id is None else case_id).strip(), prompt=prompt, seed=seed, guidance=guidance)


MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds


def _seed(value: Any, label: str) -> int:
    """A whole number in [0, 2**63): an int, or text of one (CSV cells); 1.7, true or inf are errors."""
    if value is None:
        return DEFAULT_SEED
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise UnlearnAtkError(f"{label}: seed {value!r} is not a whole number between 0 and 2**63 - 1")
    return value


def _guidance(value: Any, label: str) -> float:
    """A finite number >= 0: a number, or text of one (CSV cells); nan, inf or true are errors."""
    if value is None:
        return DEFAULT_GUIDANCE
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise UnlearnAtkError(f"{label}: guidance {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UnlearnAtkError(f"{label}: guidance {value!r} is not a finite number >= 0 (e.g. 7.5)")
    return float(value)
