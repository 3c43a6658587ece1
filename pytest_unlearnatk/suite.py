"""The pytest side of running a gate: YAML suites (``unlearn_*.yaml``) as test items, and what a
marker, a fixture and a suite item share (the run's session in ``config.stash``, running a
declared gate for a test, turning its verdict into a test outcome).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .errors import SettingProblem, UnlearnAtkError
from .report import GateRecord, failure_message
from .session import GateSession
from .spec import GateSpec, SpecError, parse_gate
from .terminal import progress_for

MARKER = "unlearn_attack"
SUITE_FILE = re.compile(r"^unlearn_.*\.ya?ml$")
SESSION = pytest.StashKey[GateSession]()


def declare(config: pytest.Config, declared: dict[str, Any], *, where: str, base_dir: Path, name: str,
            gate_id: str | None = None, allow_callables: bool = True) -> GateSpec:
    """A gate declaration checked against the run's registries (raises SpecError)."""
    return parse_gate(declared, where=where, base_dir=base_dir, name=name, allow_callables=allow_callables,
                      registries=config.stash[SESSION].registries, gate_id=gate_id)


def run_for_test(config: pytest.Config, spec: GateSpec, path: Path) -> tuple[Any, GateRecord]:
    """Run a declared gate with live progress on the terminal (raises UnlearnAtkError)."""
    with in_pytest_terms():
        return config.stash[SESSION].run(spec, progress=progress_for(config, spec.name, path))


@contextlib.contextmanager
def in_pytest_terms() -> Iterator[None]:
    """A missing setting is asked for as the option (and ini key) that gives it."""
    try:
        yield
    except SettingProblem as error:
        raise UnlearnAtkError(option_terms(error)) from None


OPTION_OF_SETTING = {"image_dir": "report"}  # run_gate keywords the plugin gives from another option


def option_terms(error: SettingProblem) -> str:
    name = OPTION_OF_SETTING.get(error.name, error.name)
    return error.as_option(f"--unlearn-{name.replace('_', '-')}", f"unlearn_{name}")


def pending_reason(record: GateRecord) -> str:
    return (
        f"unlearn gate {record.gate!r}: this shard computed {record.computed} cases; {record.pending} belong to other "
        "shards. Once every shard has run, a run without --unlearn-shard on the same store gives the verdict."
    )


class SuiteFile(pytest.File):
    """``unlearn_*.yaml``: a ``gates`` list; each entry becomes one test item."""

    def collect(self) -> Iterator[pytest.Item]:
        import yaml

        from .cases import load_yaml, read_text

        try:
            data = load_yaml(read_text(self.path))
        except UnlearnAtkError as error:  # not UTF-8, or not readable
            raise self.CollectError(str(error)) from None
        except yaml.YAMLError as error:
            raise self.CollectError(f"{self.path}: not valid YAML: {error}") from None
        unknown = sorted(map(str, set(data) - {"gates"})) if isinstance(data, dict) else []
        if unknown:
            raise self.CollectError(f"{self.path}: unknown top-level key(s) {unknown}; a suite has only 'gates'")
        if not isinstance(data, dict) or not isinstance(data.get("gates"), list) or not data["gates"]:
            raise self.CollectError(f"{self.path}: a suite is a mapping with a non-empty 'gates' list (see docs/user-guide.md)")
        names = set()
        for index, entry in enumerate(data["gates"]):
            where = f"{self.path}, gates[{index}]"
            if not isinstance(entry, dict):
                raise self.CollectError(f"{where}: each gate is a mapping of keys (concept, prompts, max_asr, ...)")
            entry = dict(entry)
            name = entry.pop("name", None) or entry.get("concept") or f"gate{index}"
            if not isinstance(name, str) or name in names:
                raise self.CollectError(f"{where}: 'name' {name!r} must be a unique string within the suite")
            if "::" in name:  # a gate's name is the last part of its test id
                raise self.CollectError(f"{where}: 'name' {name!r} holds '::', which pytest reads as the separator of "
                                        "a test id's parts (the gate could not be selected by its id); use another name")
            names.add(name)
            try:
                spec = declare(self.config, entry, where=where, base_dir=self.path.parent, name=name,
                               gate_id=f"{self.nodeid}::{name}", allow_callables=False)
            except SpecError as error:
                raise self.CollectError(str(error)) from None
            yield GateItem.from_parent(self, name=name, spec=spec)


class GateError(Exception):
    """A gate's failure or setup problem, shown as its message only."""


class GateItem(pytest.Item):
    def __init__(self, *, spec: GateSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.add_marker(MARKER)

    def runtest(self) -> None:
        try:
            result, record = run_for_test(self.config, self.spec, self.path)
        except UnlearnAtkError as error:
            raise GateError(str(error)) from None
        self.user_properties.extend(record.properties())
        if record.pending:
            pytest.skip(pending_reason(record))
        if not record.passed:
            raise GateError(failure_message(record, result))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, GateError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"unlearn gate {self.name}"
