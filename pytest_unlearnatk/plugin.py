"""The pytest adapter: hooks only (options, the ``unlearn_attack`` marker, fixtures, YAML suites).

The run's options become one :class:`~pytest_unlearnatk.options.RunOptions` in
``pytest_configure``; a :class:`~pytest_unlearnatk.session.GateSession` in ``config.stash`` runs
every gate. YAML suites and gate items live in :mod:`pytest_unlearnatk.suite`, the progress line
and the summary in :mod:`pytest_unlearnatk.terminal`. Nothing heavy is imported here: torch and
friends load when the first gate or model fixture runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .errors import UnlearnAtkError
from .options import OptionError, RunOptions
from .report import failure_message
from .spec import SpecError
from .suite import MARKER, SESSION, SUITE_FILE, SuiteFile, declare, in_pytest_terms, pending_reason, run_for_test

OUTCOME = pytest.StashKey[tuple[Any, Any]]()
LIST_FLAG = "--unlearn-list"


def _flag(name: str) -> str:
    return "--unlearn-" + name.replace("_", "-")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("unlearnatk", "concept-erasure attack gates (pytest-unlearnatk)")
    for name, meta in RunOptions.declarations():
        ini = f"unlearn_{name}"
        if meta.get("flag"):
            group.addoption(_flag(name), dest=ini, action="store_true", default=None, help=f"{meta['help']} [ini: {ini}]")
            parser.addini(ini, meta["help"], type="bool", default=False)
        else:
            group.addoption(_flag(name), dest=ini, metavar=meta["metavar"], default=None, help=f"{meta['help']} [ini: {ini}]")
            parser.addini(ini, meta["help"], default=None)
    group.addoption(LIST_FLAG, action="store_true", default=False,
                    help="list the registered attacks, judges, model sources, prompt sets and concept tables, then exit")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(concept, prompts, max_asr, judge=None, attack='unlearndiffatk', budget=None, limit=None, "
        "n_tokens=None, check_text=False, candidates_per_check=1, position_choices=None, render=None, batch=None, "
        "max_new_broken=None): make this test a safety gate that fails when the attack success rate exceeds max_asr",
    )
    def raw_value(name: str) -> Any:
        given = config.getoption(f"unlearn_{name}")  # None when not on the command line; "" when given empty
        return given if given is not None else (config.getini(f"unlearn_{name}") or None)

    raw = {name: raw_value(name) for name, _ in RunOptions.declarations()}
    try:
        options = RunOptions.from_raw(raw, root=config.rootpath)
    except OptionError as error:
        flags = " and ".join(_flag(name) for name in error.names)
        shown = f"{flags}={error.value!r}" if len(error.names) == 1 else flags
        raise pytest.UsageError(f"{shown}: {error.message}") from None
    from .session import GateSession
    from .terminal import GateReporter

    worker = getattr(config, "workerinput", {}).get("workerid")
    config.stash[SESSION] = GateSession(options, cpu_threads=_cpu_threads_per_worker(config),
                                        worker_index=int(worker[2:]) if worker and worker[2:].isdigit() else None)
    config.pluginmanager.register(GateReporter(config, options), "unlearnatk-reporter")


def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """``--unlearn-list``: print the registries and end the run (like ``--fixtures``, no tests run)."""
    if config.getoption("unlearn_list", False):
        from .listing import list_plugins
        from .registry import discover

        print("\n".join(list_plugins(discover())))
        return 0
    return None


def _cpu_threads_per_worker(config: pytest.Config) -> int:
    """Under xdist, split the CPU cores between workers: oversubscribed torch threads are many
    times slower than one thread each (measured here: 19x with 2 threads on a busy 2-core box)."""
    import os

    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    if workers <= 1:
        return 0
    return max(1, (os.cpu_count() or 1) // workers)


# --- fixtures ----------------------------------------------------------------------------------


def _fail_for_user(error: Exception) -> None:
    """Fail the test with ``error``'s message alone: it already says the cause, so pytest prints no
    chain of the exceptions it was raised from ("During handling of the above exception ...")."""
    raise pytest.fail.Exception(str(error), pytrace=False) from None


@pytest.fixture(scope="session")
def unlearned_pipeline(pytestconfig: pytest.Config) -> Any:
    """The model under test (``--unlearn-model``) as a ``LoadedModel``; loaded once per process."""
    try:
        with in_pytest_terms():
            return pytestconfig.stash[SESSION].model("model").load()
    except UnlearnAtkError as error:
        _fail_for_user(error)


@pytest.fixture(scope="session")
def base_pipeline(pytestconfig: pytest.Config) -> Any:
    """The original model (``--unlearn-base``) as a ``LoadedModel``, or None when not given."""
    try:
        with in_pytest_terms():
            base = pytestconfig.stash[SESSION].model("base")
            return base.load() if base is not None else None
    except UnlearnAtkError as error:
        _fail_for_user(error)


@pytest.fixture
def unlearn_gate(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Run a gate from a test body: ``result = unlearn_gate(concept=..., prompts=[...], max_asr=...)``.

    Takes the marker's keys, returns the ``GateResult`` (``.asr``, ``.pre_asr``, ``.cases``) and adds
    the gate to the run's summary. The verdict is yours to assert (``result.asr <= ...``).
    """
    counter = iter(range(1, 1_000_000))

    def run(*positional: Any, **declared: Any) -> Any:
        name = f"{request.node.nodeid}#{next(counter)}"
        try:
            if positional:
                raise SpecError(f"{request.node.nodeid}: give unlearn_gate keyword arguments (concept=..., prompts=..., "
                                f"max_asr=...), not {len(positional)} positional one(s)")
            spec = declare(request.config, declared, where=request.node.nodeid, base_dir=request.path.parent, name=name)
            result, record = run_for_test(request.config, spec, request.path)
        except (SpecError, UnlearnAtkError) as error:
            _fail_for_user(error)
        request.node.user_properties.extend(record.properties())
        return result

    return run


@pytest.fixture
def unlearn_result(request: pytest.FixtureRequest) -> Any:
    """The ``GateResult`` of this test's ``unlearn_attack`` marker (the gate runs before the body)."""
    marker = request.node.get_closest_marker(MARKER)
    if marker is None:
        pytest.fail(f"the unlearn_result fixture needs the @pytest.mark.{MARKER}(...) marker on the test", pytrace=False)
    if OUTCOME not in request.node.stash:
        try:
            if marker.args:
                raise SpecError(f"{request.node.nodeid}: give the {MARKER} marker keyword arguments (concept=..., prompts=..., max_asr=...)")
            markers = len(list(request.node.iter_markers(MARKER)))
            if markers > 1:  # pytest would hand over the closest and drop the rest: a stricter gate lost unseen
                raise SpecError(f"{request.node.nodeid}: {markers} {MARKER} markers (on the test, its class or module); a test "
                                "runs one gate: give each gate its own test, or parametrize with pytest.param(..., marks=...)")
            spec = declare(request.config, marker.kwargs, where=request.node.nodeid, base_dir=request.path.parent,
                           name=request.node.nodeid)
            result, record = run_for_test(request.config, spec, request.path)
        except (SpecError, UnlearnAtkError) as error:
            _fail_for_user(error)
        request.node.stash[OUTCOME] = (result, record)
        request.node.user_properties.extend(record.properties())
        if record.pending:
            pytest.skip(pending_reason(record))
    return request.node.stash[OUTCOME][0]


# --- collection and verdicts -------------------------------------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker(MARKER) is not None and isinstance(item, pytest.Function):
            if "unlearn_result" not in item.fixturenames:
                item.fixturenames.append("unlearn_result")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    outcome = yield
    if isinstance(item, pytest.Function) and OUTCOME in item.stash:
        result, record = item.stash[OUTCOME]
        if not record.passed and not record.pending:
            pytest.fail(failure_message(record, result), pytrace=False)
    return outcome


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if SUITE_FILE.match(file_path.name):
        return SuiteFile.from_parent(parent, path=file_path)
    return None
