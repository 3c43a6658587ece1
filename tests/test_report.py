"""Pure reporting logic: confidence intervals, the summary table, the failure message."""

from __future__ import annotations

import pytest

from pytest_unlearnatk import Case, CaseResult, GateResult
from pytest_unlearnatk.report import GateRecord, failure_message, summary_table, wilson_interval


@pytest.mark.parametrize(
    ("hits", "n", "low", "high"),
    [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (34, 142, 0.1767, 0.3159)],
)
def test_wilson_interval_matches_known_values(hits, n, low, high):
    assert wilson_interval(hits, n) == pytest.approx((low, high), abs=1e-4)


def _gate(hit_flags: list[tuple[bool, bool]]) -> GateResult:
    cases = []
    for index, (pre, hit) in enumerate(hit_flags):
        result = CaseResult(case=Case(str(index), f"prompt {index}"), attack="unlearndiffatk", pre_attack_hit=pre, hit=hit,
                            hit_by=("plain" if pre else "unlearndiffatk") if hit else None)
        if hit and not pre:
            result.adversarial_text, result.adversarial_ids, result.hit_step, result.hit_timestep = "xx prompt", [1, 2], 40, 10
        cases.append(result)
    return GateResult(attack="unlearndiffatk", judge="nudenet", model="m", model_fingerprint="f", config={}, cases=cases)


def test_record_table_and_message():
    result = _gate([(True, True), (False, True), (False, False), (False, False)])
    record = GateRecord.from_result("g", "nudity", "fast", 0.25, result, 1.5)
    assert (record.n, record.pre_asr, record.asr, record.passed) == (4, 0.25, 0.5, False)
    assert record.asr_ci == pytest.approx(wilson_interval(2, 4))
    assert GateRecord.from_properties(record.properties()) == record
    table = summary_table([record])
    assert "50.0% [15%-85%]" in table[1] and "FAIL" in table[1]
    message = failure_message(record, result)
    assert message.splitlines()[0].startswith("unlearn gate 'g' failed: ASR 50.0% > max_asr 25.0% (95% CI 15%-85%")
    assert "case 0 [plain prompt]: 'prompt 0'" in message
    assert "case 1 [unlearndiffatk, step 40, t=10]: 'xx prompt' ids [1, 2]" in message


def test_a_reset_knows_a_runs_files_by_their_role_not_by_the_folder_names_around_them(tmp_path):
    """A report directory that is itself named gates/ still has its stale page and run JSON
    removed; a user's files with the same names but other content stay."""
    import json

    from pytest_unlearnatk.html_report import PAGE_START
    from pytest_unlearnatk.report import reset_report_dir

    report = tmp_path / "gates"
    (report / "gates").mkdir(parents=True)
    (report / "index.html").write_text(PAGE_START + "<style></style></head><body></body></html>")
    (report / "unlearnatk-report.json").write_text(json.dumps({"format": 1, "gates": [], "options": {}}))
    (report / "gates" / "old.json").write_text(json.dumps({"record": {}, "result": {}}))
    (report / "gates" / "notes.json").write_text(json.dumps({"mine": True}))
    reset_report_dir(report)
    assert sorted(p.relative_to(report).as_posix() for p in report.rglob("*")) == ["gates", "gates/notes.json"]
