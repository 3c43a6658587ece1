"""What the plugin writes on the terminal: the live progress line of a running gate and the
summary of every gate at the end of the run (also those xdist workers ran).

Part of the pytest adapter: it uses pytest's terminal reporter and capture manager, and hands
the numbers to :mod:`pytest_unlearnatk.report`.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from .errors import SettingProblem
from .report import GateRecord, append_markdown, reset_report_dir, summary_table, write_run_report


def progress_for(config: pytest.Config, gate: str, path: Path) -> TerminalProgress | bool:
    """Live progress: a self-rewriting line on a terminal, plain lines when the output is piped
    (CI logs); none under -q or on xdist workers (their output is not shown while they run)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if hasattr(config, "workerinput") or config.get_verbosity() < 0 or reporter is None:
        return False
    return (TerminalProgress if reporter.isatty() else PlainProgress)(config, reporter, gate, path)


class TerminalProgress:
    """One self-rewriting line per gate: cases done, hits, the current case's step, time left.

    Written with pytest's capture suspended (like live logging), on a line of its own; pytest's
    outcome for the test follows on the next line. Redrawn at most twice a second.
    """

    REDRAW_AT_MOST_EVERY_S = 0.5

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
        if not finished and now - self.last_draw < self.REDRAW_AT_MOST_EVERY_S:
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


class PlainProgress(TerminalProgress):
    """Progress for logs (output piped, as on CI runners): whole lines, no carriage returns. A line
    when a case finishes or one-off work starts (loading a model, rendering a target image), at
    most one a second; else one every 30 s; and one when the gate ends."""

    EVERY_S = 30.0
    AT_MOST_EVERY_S = 1.0

    def __init__(self, config: pytest.Config, reporter: Any, gate: str, path: Path) -> None:
        super().__init__(config, reporter, gate, path)
        self.last_draw = time.monotonic() - self.AT_MOST_EVERY_S  # the first news is shown at once
        self.last_done, self.last_phase = 0, None

    def __call__(self, progress: Any) -> None:
        now = time.monotonic()
        finished = progress.done == progress.total
        news = progress.done != self.last_done or (progress.phase and progress.phase != self.last_phase)
        waited = now - self.last_draw
        if not (finished or (news and waited >= self.AT_MOST_EVERY_S) or waited >= self.EVERY_S):
            return
        self.last_draw, self.last_done, self.last_phase = now, progress.done, progress.phase
        with self.capture.global_and_fixture_disabled() if self.capture else contextlib.nullcontext():
            self.reporter.ensure_newline()
            self.reporter.write_line(f"[unlearn] {self.gate}: {progress.line()}")
            if finished and not self.verbose:
                self.writer.write(os.path.relpath(self.path, self.reporter.startpath) + " ")
                self.reporter.currentfspath = self.path
            self.writer.flush()


class GateReporter:
    """Collects gate records from test reports (also those that xdist workers send) and reports them."""

    def __init__(self, config: pytest.Config, options: Any) -> None:
        self.config, self.options = config, options
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
            report = self.options.report
            if report and not hasattr(self.config, "workerinput"):
                terminalreporter.write_line(f"report: {Path(report) / 'index.html'}")

    def pytest_sessionstart(self) -> None:
        """A report directory starts empty of earlier runs' gates (the controller does it, before workers)."""
        if self.options.report and not hasattr(self.config, "workerinput"):
            try:
                reset_report_dir(self.options.report)
            except SettingProblem as error:
                raise pytest.UsageError(error.as_option("--unlearn-report", "unlearn_report")) from None

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(self.config, "workerinput") or not self.records:
            return
        options = self.options
        try:
            if options.report:
                write_run_report(options.report, options.to_dict(), self.records, options.show_unsafe)
            if options.markdown:
                append_markdown(options.markdown, self.records)
        except SettingProblem as error:  # the gates ran; their report could not be written: say so, fail the run
            reporter = self.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                flag = "--unlearn-" + error.name.replace("_", "-")
                reporter.write_line(f"unlearnatk: {error.as_option(flag, f'unlearn_{error.name}')}", red=True)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
