"""Turn gate results into text people read: the failure message, the summary table, the JSON report."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ._paths import atomic_write_bytes, ensure_writable_dir
from .errors import SettingProblem
from .results import WHITE_BOX, GateResult

MAX_BROKEN_SHOWN = 5
PROMPT_CHARS = 90


@dataclass
class GateRecord:
    """One gate's verdict in a run: what the summary table, JUnit properties and JSON report show."""

    gate: str
    model: str
    concept: str
    judge: str
    attack: str
    budget: str
    n: int
    skipped: int
    pre_asr: float
    asr: float
    max_asr: float
    passed: bool
    seconds: float
    reused: int = 0  # case results taken from the store
    computed: int = 0  # cases computed in this run
    pending: int = 0  # cases left to other shards (no verdict yet)
    lower_bound: bool = False  # replay only: the true ASR may be higher
    pre_asr_ci: tuple[float, float] = (0.0, 1.0)  # 95% Wilson interval
    asr_ci: tuple[float, float] = (0.0, 1.0)
    gate_id: str = ""  # unique in the run (the test's node id): names the gate's report files
    declared_cases: int = 0  # cases the gate declares; more than ran when --unlearn-limit made it partial
    stopped: int = 0  # cases not run: the verdict was settled before them (--unlearn-stop=settled)
    asr_range: tuple[float, float] = (0.0, 1.0)  # what the ASR could be with the cases not run
    vs_baseline: str = ""  # the comparison with --unlearn-baseline's record of this gate, in words
    newly_broken: int = -1  # cases broken now that resisted in the baseline (-1: no baseline)
    newly_resisting: int = -1
    baseline_p: float = 1.0  # exact McNemar p-value of the difference
    baseline_unpaired: int = 0  # counted cases the baseline has no result for (not compared)
    max_new_broken: int = -1  # the gate's limit on newly broken cases (-1: none)
    model_description: str = ""  # what was loaded, in one line ("LoRA rank 4 on unet (192 modules) over ...")
    white_box_bound: bool = False  # learned embeddings (concept inversion): an upper bound on what prompts do

    @property
    def partial(self) -> bool:
        """Only the first cases ran (``--unlearn-limit``): the verdict covers those, not the gate."""
        return self.declared_cases > self.n + self.skipped + self.pending + self.stopped

    @classmethod
    def from_result(cls, gate: str, concept: str, budget: str, max_asr: float, result: GateResult, seconds: float,
                    gate_id: str = "", declared_cases: int = 0, comparison: Any = None,
                    max_new_broken: int | None = None) -> GateRecord:
        """The record of a finished gate. A gate that counted no case (all skipped) fails: a
        verdict on nothing is no evidence that the erasure holds."""
        regressed = comparison is not None and max_new_broken is not None and comparison.newly_broken > max_new_broken
        return cls(
            gate=gate, model=result.model, concept=concept, judge=result.judge, attack=result.attack, budget=budget,
            n=result.n, skipped=result.skipped, pre_asr=result.pre_asr, asr=result.asr, max_asr=max_asr,
            passed=result.n > 0 and result.asr <= max_asr and not regressed, seconds=seconds, reused=result.reused, computed=result.computed,
            pending=result.pending, lower_bound=result.replay_only,
            pre_asr_ci=wilson_interval(sum(c.pre_attack_hit for c in result.counted), result.n),
            asr_ci=wilson_interval(sum(c.hit for c in result.counted), result.n), gate_id=gate_id or gate,
            declared_cases=declared_cases or len(result.cases), stopped=result.stopped, asr_range=result.asr_range,
            vs_baseline=comparison.line() if comparison else "",
            newly_broken=comparison.newly_broken if comparison else -1,
            newly_resisting=comparison.newly_resisting if comparison else -1,
            baseline_p=comparison.p_value if comparison else 1.0,
            baseline_unpaired=comparison.unpaired if comparison else 0,
            max_new_broken=-1 if max_new_broken is None else max_new_broken,
            model_description=result.model_description,
            white_box_bound=result.white_box_bound,
        )

    def properties(self) -> list[tuple[str, Any]]:
        """As pytest user properties (they reach JUnit XML, and travel from xdist workers)."""
        return [(f"unlearn_{k}", v) for k, v in asdict(self).items()]

    @classmethod
    def from_properties(cls, properties: list[tuple[str, Any]]) -> GateRecord | None:
        values = {k[len("unlearn_"):]: v for k, v in properties if k.startswith("unlearn_")}
        try:
            return cls(**{k: tuple(v) if k.endswith(("_ci", "_range")) else v for k, v in values.items()})
        except TypeError:
            return None  # not a gate's test

    @classmethod
    def all_from_properties(cls, properties: list[tuple[str, Any]]) -> list[GateRecord]:
        """Every gate recorded in one test's properties (a test body may run several gates)."""
        groups: list[list[tuple[str, Any]]] = []
        for key, value in properties:
            if key == "unlearn_gate" or (key.startswith("unlearn_") and not groups):
                groups.append([])  # each record starts with its gate's name
            if key.startswith("unlearn_"):
                groups[-1].append((key, value))
        return [record for group in groups if (record := cls.from_properties(group)) is not None]


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a rate ``hits / n`` (sensible also near 0% and 100%)."""
    if n == 0:
        return (0.0, 1.0)
    rate = hits / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((rate * (1 - rate) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _rate(rate: float, interval: tuple[float, float], prefix: str = "") -> str:
    return f"{prefix}{rate:.1%} [{interval[0]:.0%}-{interval[1]:.0%}]"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= PROMPT_CHARS else text[: PROMPT_CHARS - 3] + "..."


def failure_message(record: GateRecord, result: GateResult) -> str:
    """Why a gate failed, short enough for a CI log: the numbers, then a few broken cases."""
    if record.n == 0:
        reasons = sorted({c.skip_reason for c in result.cases if c.skip_reason})
        return (
            f"unlearn gate {record.gate!r} failed: no case was counted ({record.skipped} skipped), so there is no "
            f"evidence the erasure holds. Skipped because: {reasons[0] if reasons else 'no cases'}"
            f"{f' (and {len(reasons) - 1} more)' if len(reasons) > 1 else ''}. Use long_prompts 'truncate', "
            "fewer adversarial tokens, or shorter prompts."
        )
    if record.asr <= record.max_asr:  # within max_asr: it failed on regressions against the baseline
        return (f"unlearn gate {record.gate!r} failed: {record.newly_broken} cases newly broken against the baseline "
                f"(max_new_broken {record.max_new_broken}), although ASR {record.asr:.1%} <= max_asr "
                f"{record.max_asr:.1%}\n{record.vs_baseline}")
    lines = [
        f"unlearn gate {record.gate!r} failed: ASR {record.asr:.1%} > max_asr {record.max_asr:.1%} "
        f"(95% CI {record.asr_ci[0]:.0%}-{record.asr_ci[1]:.0%}; pre-ASR {record.pre_asr:.1%}, n={record.n}, "
        f"concept {record.concept}, judge {record.judge}, "
        f"attack {record.attack}, budget {record.budget})",
        f"model: {record.model}" + (f" ({record.model_description})" if record.model_description else ""),
    ]
    if record.vs_baseline:
        lines.append(record.vs_baseline)
    if record.lower_bound:
        lines.insert(1, "(replay only: no optimization ran, so this ASR is a lower bound)")
    if record.white_box_bound:
        lines.insert(1, f"({WHITE_BOX}: no user could type these prompts)")
    if record.partial:
        lines.insert(1, f"(partial: only the first {record.n + record.skipped} of {record.declared_cases} cases ran, --unlearn-limit)")
    if record.stopped:
        low, high = record.asr_range
        lines.insert(1, f"(settled early: {record.stopped} cases not run; with them the ASR would be {low:.1%}-{high:.1%}, "
                        "above max_asr either way)")
    broken = [c for c in result.counted if c.hit]
    lines.append(f"broken cases ({min(len(broken), MAX_BROKEN_SHOWN)} of {len(broken)} shown):")
    for case in broken[:MAX_BROKEN_SHOWN]:
        if case.hit_by == "plain":
            lines.append(f"  case {case.case.case_id} [plain prompt]: {_short(case.case.prompt)!r}")
        else:
            lines.append(
                f"  case {case.case.case_id} [{case.hit_by}, step {case.hit_step}, t={case.hit_timestep}]: "
                f"{_short(case.adversarial_text or '')!r} ids {case.adversarial_ids}"
            )
    return "\n".join(lines)


SUMMARY_HEADER = ("gate", "model", "concept", "attack", "budget", "n", "pre-ASR", "ASR", "max", "verdict", "cases run",
                  "vs baseline", "time")


def summary_rows(records: list[GateRecord]) -> list[tuple[str, ...]]:
    names = [r.gate for r in records]
    return [
        (
            r.gate if names.count(r.gate) == 1 else r.gate_id or r.gate,  # two suites' 'circle': their ids
            Path(r.model).name or r.model, r.concept, r.attack, r.budget, str(r.n), _rate(r.pre_asr, r.pre_asr_ci),
            _rate(r.asr, r.asr_ci, ">=" if r.lower_bound else "") + (" white-box bound" if r.white_box_bound else "")
            if not r.stopped
            else f"{r.asr_range[0]:.1%}-{r.asr_range[1]:.1%} (settled)", f"{r.max_asr:.1%}", _verdict(r),
            f"{r.computed} computed, {r.reused} from store", _baseline_cell(r), f"{r.seconds:.1f}s",
        )
        for r in records
    ]


def _baseline_cell(record: GateRecord) -> str:
    if record.newly_broken < 0:
        return "-"
    unpaired = f", {record.baseline_unpaired} not in baseline" if record.baseline_unpaired else ""
    return f"+{record.newly_broken} broken, +{record.newly_resisting} resisting (p={record.baseline_p:.2g}){unpaired}"


def summary_table(records: list[GateRecord]) -> list[str]:
    """The terminal summary; rates with their 95% Wilson interval; ASR of a replay-only run is
    shown as '>=x%' (a lower bound). Below the table, one line per model says what was loaded."""
    rows = [SUMMARY_HEADER, *summary_rows(records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(SUMMARY_HEADER))]
    table = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return table + [f"model {name}: {description}" for name, description in model_lines(records)]


def model_lines(records: list[GateRecord]) -> list[tuple[str, str]]:
    """(model as the table names it, what was loaded) of each model the records name, once each."""
    seen: dict[str, str] = {}
    for record in records:
        if record.model_description:
            seen.setdefault(Path(record.model).name or record.model, record.model_description)
    return list(seen.items())


def markdown_summary(records: list[GateRecord]) -> str:
    """The summary as a Markdown table (a CI job's summary page) and how many gates passed."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["### unlearn gates", "", "| " + " | ".join(SUMMARY_HEADER) + " |", "|" + "---|" * len(SUMMARY_HEADER)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in summary_rows(records)]
    failed = [r for r in records if not r.passed and not r.pending]
    described = [f"- model `{name}`: {cell(description)}" for name, description in model_lines(records)]
    lines += [""] + described if described else []
    lines += ["", f"{len(records) - len(failed)} of {len(records)} gates passed."]
    if any(r.partial for r in records):
        lines.append("Partial gates ran only their first cases (--unlearn-limit): their verdicts cover those cases only.")
    return "\n".join(lines) + "\n"


def _verdict(record: GateRecord) -> str:
    if record.pending:
        return f"PENDING ({record.pending} cases in other shards)"
    verdict = "PASS" if record.passed else "FAIL"
    if record.stopped:
        verdict += f" (settled, {record.stopped} not run)"
    return f"{verdict} (partial: first {record.n + record.skipped} of {record.declared_cases})" if record.partial else verdict


def append_markdown(path: str | Path, records: list[GateRecord]) -> None:
    """Add the Markdown summary to ``path`` (CI summary files are shared by several steps: append)."""
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(markdown_summary(records))
    except OSError as error:
        raise SettingProblem("markdown", f"could not write the Markdown summary to {path} ({error.strerror or error})",
                             "PATH, a writable file") from None


def write_json(path: Path, data: Any) -> None:
    """Strict JSON (a NaN is a bug, never written); a directory that cannot be written names the setting."""
    from .images import report_problem

    try:
        atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False).encode("utf-8"))
    except OSError as error:
        raise report_problem(path.parent, error) from None


def _json_keys(path: Path) -> set[str]:
    """The top-level keys of a JSON object file; empty when it is not one."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def _is_gate_report(path: Path) -> bool:
    return path.suffix == ".json" and _json_keys(path) == {"record", "result"}


def _is_kept_image(path: Path) -> bool:
    from .images import IMAGE_NAME

    return bool(IMAGE_NAME.fullmatch(path.name))


def _is_report_page(path: Path) -> bool:
    from .html_report import PAGE_START

    start = PAGE_START.encode("utf-8")
    with open(path, "rb") as handle:
        return handle.read(len(start)) == start


def _is_run_report(path: Path) -> bool:
    return {"format", "gates", "options"} <= _json_keys(path)


# what a run writes in its report directory, and how each file is recognised as a run's (name and content)
REPORT_FILES = {"index.html": _is_report_page, "unlearnatk-report.json": _is_run_report}
REPORT_FOLDERS = {"gates": _is_gate_report, "images": _is_kept_image}


def reset_report_dir(report_dir: str | Path) -> None:
    """Make sure ``report_dir`` can be written, and remove what earlier runs wrote there, so the
    report holds this run's gates and nothing stale: only files a run writes (``REPORT_FILES``,
    ``REPORT_FOLDERS``); the user's own files stay, even in ``gates/`` or ``images/`` (a folder is
    removed only once it is empty)."""
    directory = Path(report_dir)
    try:
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(20, "it is a file, not a directory")
        ensure_writable_dir(directory)  # found now, not after the gates ran
        written = [(directory / name, ours) for name, ours in REPORT_FILES.items()]
        for name, ours in REPORT_FOLDERS.items():
            if (directory / name).is_dir():
                written += [(path, ours) for path in (directory / name).iterdir()]
        for path, ours in written:
            if path.is_file() and ours(path):
                path.unlink()
        for name in REPORT_FOLDERS:
            if (directory / name).is_dir() and not any((directory / name).iterdir()):
                (directory / name).rmdir()
    except OSError as error:
        from .images import report_problem

        raise report_problem(directory, error) from None


def gate_file_name(gate: str) -> str:
    """The name of a gate's JSON file under ``<report>/gates/``."""
    from .images import safe_name

    return f"{safe_name(gate)}.json"


def write_gate_report(report_dir: str | Path, record: GateRecord, result: GateResult) -> None:
    """``<report>/gates/<gate id>.json``: the gate's record and every case of its result."""
    path = Path(report_dir) / "gates" / gate_file_name(record.gate_id)
    write_json(path, {"record": asdict(record), "result": result.to_dict()})


def write_run_report(report_dir: str | Path, options: dict[str, Any], records: list[GateRecord], show_unsafe: bool) -> Path:
    """The run's reports: ``unlearnatk-report.json`` (every gate's record) and the HTML page; returns the page."""
    import time

    from .html_report import write_html_report
    from .images import report_problem

    try:
        page = write_html_report(report_dir, [gate_file_name(r.gate_id) for r in records], show_unsafe)
    except OSError as error:
        raise report_problem(Path(report_dir), error) from None
    write_json(Path(report_dir) / "unlearnatk-report.json", {
        "format": 1, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "options": options,
        "gates": [asdict(record) for record in records],
    })
    return page
