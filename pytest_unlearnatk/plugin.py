"""The pytest adapter: options, the ``unlearn_attack`` marker, fixtures, YAML suites, verdicts, summary.

Hooks only; the work is done by the core modules (``gate``, ``models``, ``spec``, ``report``).
Nothing heavy is imported here: torch and friends load when the first gate or model fixture runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .errors import UnlearnAtkError
from .report import GateRecord, failure_message, summary_table, write_json
from .spec import GateSpec, SpecError, parse_gate

MARKER = "unlearn_attack"
SUITE_FILE = re.compile(r"^unlearn_.*\.ya?ml$")

# (option, metavar, help, default); the ini name is the option's name with underscores
OPTIONS = [
    ("--unlearn-model", "PATH", "the unlearned model under test: pipeline directory, hub id, or UNet/text-encoder weights file", None),
    ("--unlearn-base", "PATH", "the original model: renders target images; the base a weights file is applied over", None),
    ("--unlearn-device", "DEVICE", "auto (default: cuda when available, else cpu), cpu, cuda, cuda:N", "auto"),
    ("--unlearn-dtype", "DTYPE", "auto (default: float16 on GPU, float32 on CPU), float32, float16, bfloat16", "auto"),
    ("--unlearn-budget", "PRESET", "attack budget for every gate: smoke, fast, reference (default: each gate's own, else reference)", None),
    ("--unlearn-report", "DIR", "directory for the JSON report and the images of every gate", None),
    ("--unlearn-store", "DIR", "the adversarial-prompt store (default: .unlearnatk in the rootdir)", None),
    ("--unlearn-batch", "N", "cases UnlearnDiffAtk optimizes at once: a number or auto (default: each gate's batch, else auto: by free memory and the model's size, at most 8 on CPU and 16 on a GPU)", None),
    ("--unlearn-shard", "I/N", "run only the I-th of N slices of each gate's cases; the verdict comes from a run with all slices in the store", None),
]
# (flag, help); each also an ini boolean
FLAGS = [
    ("--unlearn-replay-only", "no optimization: judge plain prompts and replay stored adversarial prompts only (ASR is a lower bound)"),
    ("--unlearn-no-store", "neither read nor write the store"),
    ("--unlearn-store-readonly", "read the store, never write it (CI on a committed store)"),
    ("--unlearn-compile", "run the attack's UNet through torch.compile (GPU runs of long gates; the first steps compile)"),
    ("--unlearn-show-unsafe", "do not blur images of unsafe concepts (nudity) in the HTML report"),
]


def _ini_name(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


@dataclass
class RunState:
    """Per-run state, kept in ``config.stash``: options, loaded models, gate records."""

    options: dict[str, Any]
    models: dict[tuple, Any] = field(default_factory=dict)
    cpu_threads: int = 0  # torch threads to use (0: leave torch's default)
    worker_index: int | None = None  # the xdist worker's number (gw3 -> 3); None outside xdist
    threads_set: bool = False

    def model(self, which: str) -> Any:
        """The unlearned (``which="model"``) or base model as a LazyModel (loaded on first real use)."""
        from .models import LazyModel

        source = self.options[which]
        if which == "base" and source is None:
            # no --unlearn-base: the base the model itself names (toy:erased -> toy:base), if any
            source = self.model("model").base if self.options["model"] is not None else None
            if source is None:
                return None
        if source is None:
            raise UnlearnAtkError(
                "this gate needs a model under test: pass --unlearn-model=PATH (a pipeline directory, hub id, "
                "or weights file with --unlearn-base), or set unlearn_model in your pytest ini file"
            )
        base = self.options["base"] if which == "model" else None
        key = (source, base)
        if key not in self.models:
            self.models[key] = LazyModel(source, base=base, device=self.device(), dtype=self.options["dtype"])
        return self.models[key]

    def device(self) -> str:
        """``--unlearn-device``; on an xdist worker, ``auto``/``cuda`` become this worker's own GPU."""
        requested = self.options["device"] or "auto"
        if self.worker_index is None or requested not in ("auto", "cuda"):
            return requested
        import torch

        from .models import worker_device

        return worker_device(requested, self.worker_index, torch.cuda.device_count() if torch.cuda.is_available() else 0)

    def store(self) -> Any:
        from .store import Store

        if self.options["no_store"]:
            return None
        return Store(self.options["store"], readonly=self.options["store_readonly"])

    def run(self, spec: GateSpec, progress: Any) -> tuple[Any, GateRecord]:
        from .gate import run_spec

        if self.cpu_threads and not self.threads_set:
            import torch

            torch.set_num_threads(self.cpu_threads)
            self.threads_set = True

        report = self.options["report"]
        image_dir = Path(report) / "images" / _safe(spec.name) if report else None
        result, record = run_spec(
            spec, self.model("model"), self.model("base"), budget=self.options["budget"], image_dir=image_dir,
            progress=progress, store=self.store(), replay_only=self.options["replay_only"], shard=self.options["shard"],
            batch_size=self.options["batch"], compile_unet=self.options["compile"],
        )
        if report:
            write_json(Path(report) / "gates" / f"{_safe(spec.name)}.json", {"record": record.__dict__, "result": result.to_dict()})
        return result, record


def _pending_reason(record: GateRecord) -> str:
    return (
        f"unlearn gate {record.gate!r}: this shard computed {record.computed} cases; {record.pending} belong to other "
        "shards. Once every shard has run, a run without --unlearn-shard on the same store gives the verdict."
    )


STATE = pytest.StashKey[RunState]()
OUTCOME = pytest.StashKey[tuple[Any, GateRecord]]()


def _cpu_threads_per_worker(config: pytest.Config) -> int:
    """Under xdist, split the CPU cores between workers: oversubscribed torch threads are many
    times slower than one thread each (measured here: 19x with 2 threads on a busy 2-core box)."""
    import os

    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    if workers <= 1:
        return 0
    return max(1, (os.cpu_count() or 1) // workers)


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise pytest.UsageError(f"--unlearn-shard={value!r}: give I/N with 1 <= I <= N, e.g. 1/4")
    return int(match[1]), int(match[2])


def _parse_batch(value: str | None) -> int | str | None:
    if value is None or str(value).strip() == "auto":
        return None
    if not str(value).strip().isdigit() or int(value) < 1:
        raise pytest.UsageError(f"--unlearn-batch={value!r}: give a whole number of cases >= 1 (e.g. 8), or auto")
    return int(value)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:120] or "gate"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("unlearnatk", "concept-erasure attack gates (pytest-unlearnatk)")
    for option, metavar, help_text, default in OPTIONS:
        ini = _ini_name(option)
        group.addoption(option, dest=ini, metavar=metavar, default=None, help=f"{help_text} [ini: {ini}]")
        parser.addini(ini, help_text, default=default)
    for flag, help_text in FLAGS:
        ini = _ini_name(flag)
        group.addoption(flag, dest=ini, action="store_true", default=None, help=f"{help_text} [ini: {ini}]")
        parser.addini(ini, help_text, type="bool", default=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(concept, prompts, max_asr, judge=None, attack='unlearndiffatk', budget=None, limit=None, "
        "n_tokens=None, render=None, batch=None): make this test a safety gate that fails when the attack success rate exceeds max_asr",
    )
    options: dict[str, Any] = {}
    for option, *_ in OPTIONS:
        ini = _ini_name(option)
        options[ini.removeprefix("unlearn_")] = config.getoption(ini) or config.getini(ini) or None
    for flag, _ in FLAGS:
        ini = _ini_name(flag)
        options[ini.removeprefix("unlearn_")] = bool(config.getoption(ini) or config.getini(ini))
    from .attacks import PRESETS

    if options["budget"] is not None and options["budget"] not in PRESETS:
        raise pytest.UsageError(f"--unlearn-budget={options['budget']!r}: use one of {', '.join(PRESETS)}")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", options["device"] or "auto"):
        raise pytest.UsageError(f"--unlearn-device={options['device']!r}: use auto, cpu, cuda or cuda:N")
    if (options["dtype"] or "auto").lower() not in ("auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16"):
        raise pytest.UsageError(f"--unlearn-dtype={options['dtype']!r}: use auto, float32, float16 or bfloat16")
    options["shard"] = _parse_shard(options["shard"])
    options["batch"] = _parse_batch(options["batch"])
    if options["no_store"] and options["store_readonly"]:
        raise pytest.UsageError("--unlearn-no-store and --unlearn-store-readonly contradict each other; pick one")
    if options["no_store"] and options["shard"]:
        raise pytest.UsageError("--unlearn-shard needs the store (shards meet there); drop --unlearn-no-store")
    options["store"] = str(Path(options["store"] or config.rootpath / ".unlearnatk").resolve())
    worker = getattr(config, "workerinput", {}).get("workerid")
    config.stash[STATE] = RunState(options=options, cpu_threads=_cpu_threads_per_worker(config),
                                   worker_index=int(worker[2:]) if worker and worker[2:].isdigit() else None)
    config.pluginmanager.register(GateReporter(config), "unlearnatk-reporter")


# --- fixtures ----------------------------------------------------------------------------------


def _fail_for_user(error: Exception) -> None:
    pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def unlearned_pipeline(pytestconfig: pytest.Config) -> Any:
    """The model under test (``--unlearn-model``) as a ``LoadedModel``; loaded once per process."""
    try:
        return pytestconfig.stash[STATE].model("model").load()
    except UnlearnAtkError as error:
        _fail_for_user(error)


@pytest.fixture(scope="session")
def base_pipeline(pytestconfig: pytest.Config) -> Any:
    """The original model (``--unlearn-base``) as a ``LoadedModel``, or None when not given."""
    try:
        base = pytestconfig.stash[STATE].model("base")
        return base.load() if base is not None else None
    except UnlearnAtkError as error:
        _fail_for_user(error)


@pytest.fixture
def unlearn_gate(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Run a gate from a test body: ``result = unlearn_gate(concept=..., prompts=[...], max_asr=...)``.

    Takes the marker's keys, returns the ``GateResult`` (``.asr``, ``.pre_asr``, ``.cases``) and adds
    the gate to the run's summary. The verdict is yours to assert (``result.asr <= ...``).
    """
    state = request.config.stash[STATE]
    counter = iter(range(1, 1_000_000))

    def run(**declared: Any) -> Any:
        name = f"{request.node.nodeid}#{next(counter)}"
        try:
            spec = parse_gate(declared, where=request.node.nodeid, base_dir=request.path.parent, name=name)
            result, record = state.run(spec, progress=_progress(request.config, spec.name, request.path))
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
            spec = parse_gate(marker.kwargs, where=request.node.nodeid, base_dir=request.path.parent, name=request.node.nodeid)
            result, record = request.config.stash[STATE].run(spec, progress=_progress(request.config, spec.name, request.path))
        except (SpecError, UnlearnAtkError) as error:
            _fail_for_user(error)
        request.node.stash[OUTCOME] = (result, record)
        request.node.user_properties.extend(record.properties())
        if record.pending:
            pytest.skip(_pending_reason(record))
    return request.node.stash[OUTCOME][0]


def _progress(config: pytest.Config, gate: str, path: Path) -> TerminalProgress | bool:
    """Live progress on a terminal; none under -q, on a pipe or file, or on xdist workers."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if hasattr(config, "workerinput") or config.get_verbosity() < 0 or reporter is None or not reporter.isatty():
        return False
    return TerminalProgress(config, reporter, gate, path)


class TerminalProgress:
    """One self-rewriting line per gate: cases done, hits, the current case's step, time left.

    Written with pytest's capture suspended (like live logging), on a line of its own; pytest's
    outcome for the test follows on the next line. Redrawn at most twice a second.
    """

    def __init__(self, config: pytest.Config, reporter: Any, gate: str, path: Path) -> None:
        self.capture = config.pluginmanager.get_plugin("capturemanager")
        self.verbose = config.get_verbosity() > 0
        self.path = path
        self.reporter, self.writer = reporter, config.get_terminal_writer()
        self.gate = gate.rsplit("::", 1)[-1]  # a marker's gate is named by its test id
        self.last_draw = 0.0
        self.started = False

    def __call__(self, progress: Any) -> None:
        now = time.monotonic()
        finished = progress.done == progress.total
        if not finished and now - self.last_draw < 0.5:
            return
        self.last_draw = now
        with self.capture.global_and_fixture_disabled() if self.capture else contextlib.nullcontext():
            if not self.started:
                self.reporter.ensure_newline()  # pytest writes the test's prefix again before its outcome
                if self.writer.width_of_current_line:  # another gate's line of this test
                    self.reporter.write("\n")
                self.started = True
            width = self.writer.fullwidth - 1
            self.reporter.rewrite(f"  {self.gate}: {progress.line()}"[:width], erase=True)
            if finished and not self.verbose:
                # pytest only appends the outcome letter: give it back its file prefix on a new line
                self.writer.line()
                self.writer.write(os.path.relpath(self.path, self.reporter.startpath) + " ")
                self.reporter.currentfspath = self.path
            self.writer.flush()


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


# --- YAML suites -------------------------------------------------------------------------------


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if SUITE_FILE.match(file_path.name):
        return SuiteFile.from_parent(parent, path=file_path)
    return None


class SuiteFile(pytest.File):
    """``unlearn_*.yaml``: a ``gates`` list; each entry becomes one test item."""

    def collect(self) -> Iterator[pytest.Item]:
        import yaml

        try:
            data = yaml.safe_load(self.path.read_text("utf-8"))
        except yaml.YAMLError as error:
            raise self.CollectError(f"{self.path}: not valid YAML: {error}") from None
        if not isinstance(data, dict) or not isinstance(data.get("gates"), list) or not data["gates"]:
            raise self.CollectError(f"{self.path}: a suite is a mapping with a non-empty 'gates' list (see docs/user-guide.md)")
        unknown = sorted(set(data) - {"gates"})
        if unknown:
            raise self.CollectError(f"{self.path}: unknown top-level key(s) {unknown}; a suite has only 'gates'")
        names = set()
        for index, entry in enumerate(data["gates"]):
            where = f"{self.path}, gates[{index}]"
            if not isinstance(entry, dict):
                raise self.CollectError(f"{where}: each gate is a mapping of keys (concept, prompts, max_asr, ...)")
            entry = dict(entry)
            name = entry.pop("name", None) or entry.get("concept") or f"gate{index}"
            if not isinstance(name, str) or name in names:
                raise self.CollectError(f"{where}: 'name' {name!r} must be a unique string within the suite")
            names.add(name)
            try:
                spec = parse_gate(entry, where=where, base_dir=self.path.parent, name=name, allow_callables=False)
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
        state = self.config.stash[STATE]
        try:
            result, record = state.run(self.spec, progress=_progress(self.config, self.spec.name, self.path))
        except UnlearnAtkError as error:
            raise GateError(str(error)) from None
        self.user_properties.extend(record.properties())
        if record.pending:
            pytest.skip(_pending_reason(record))
        if not record.passed:
            raise GateError(failure_message(record, result))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, GateError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"unlearn gate {self.name}"


# --- reporting ---------------------------------------------------------------------------------


class GateReporter:
    """Collects gate records from test reports (also those that xdist workers send) and reports them."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.by_test: dict[tuple[str, str], GateRecord] = {}  # (test id, gate name) -> record

    @property
    def records(self) -> list[GateRecord]:
        return list(self.by_test.values())

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for record in GateRecord.all_from_properties(report.user_properties):
            self.by_test[(report.nodeid, record.gate)] = record

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.records:
            terminalreporter.section("unlearn gates")
            for line in summary_table(self.records):
                terminalreporter.write_line(line)
            report = self.config.stash[STATE].options["report"]
            if report and not hasattr(self.config, "workerinput"):
                terminalreporter.write_line(f"report: {Path(report) / 'index.html'}")

    def pytest_sessionfinish(self) -> None:
        options = self.config.stash[STATE].options
        report = options["report"]
        if hasattr(self.config, "workerinput") or not report or not self.records:
            return
        from .html_report import write_html_report

        write_html_report(report, [f"{_safe(r.gate)}.json" for r in self.records], options["show_unsafe"])
        write_json(
            Path(report) / "unlearnatk-report.json",
            {
                "format": 1,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "options": self.config.stash[STATE].options,
                "gates": [record.__dict__ for record in self.records],
            },
        )
