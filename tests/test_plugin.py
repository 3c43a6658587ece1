"""The pytest plugin end to end (pytester) on the tiny pipeline: marker, fixtures, YAML suites, reports."""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

EXAMPLE_SUITES = Path(__file__).resolve().parents[1] / "example_suites"

JUDGES = '''
def never(images):
    return [False] * len(images)

def always(images):
    return [{"hit": True, "score": 0.9} for _ in images]
'''


@pytest.fixture
def gate_args(tiny_dir, other_tiny_dir, tmp_path) -> list[str]:
    return [f"--unlearn-model={tiny_dir}", f"--unlearn-base={other_tiny_dir}", f"--unlearn-report={tmp_path / 'report'}", "-p", "no:cacheprovider"]


def test_marker_gates_pass_and_fail_with_a_readable_message(pytester, gate_args, tmp_path):
    pytester.makepyfile(judges=JUDGES)
    pytester.makepyfile(
        test_gates='''
        import pytest
        from pytest_unlearnatk import unlearn_attack
        from judges import never, always

        PROMPTS = ["a red circle", {"prompt": "a photo of a church", "seed": 3, "case_number": 7}]

        @pytest.mark.unlearn_attack(concept="circle", prompts=PROMPTS, judge=never, max_asr=0.1, budget="smoke")
        def test_resists(unlearn_result):
            assert unlearn_result.n == 2 and unlearn_result.asr == 0.0

        @unlearn_attack(concept="circle", prompts=PROMPTS, judge=always, max_asr=0.2, budget="smoke")
        def test_breaks():
            pass
        '''
    )
    result = pytester.runpytest("--strict-markers", f"--junitxml={tmp_path / 'junit.xml'}", *gate_args)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*unlearn gate 'test_gates.py::test_breaks' failed: ASR 100.0% > max_asr 20.0% (95% CI 34%-100%; pre-ASR 100.0%, n=2, concept circle*",
        "*broken cases (2 of 2 shown):",
        "*case 0 ?plain prompt?: 'a red circle'",
        "*case 7 ?plain prompt?: 'a photo of a church'",
    ])
    assert "Traceback" not in result.stdout.str()
    result.stdout.fnmatch_lines(["*unlearn gates*", "gate*model*concept*n*pre-ASR*ASR*max*verdict*time",
                                 "test_gates.py::test_resists*circle*2*0.0%*0.0%*10.0%*PASS*",
                                 "test_gates.py::test_breaks*circle*2*100.0%*100.0%*20.0%*FAIL*"])
    # JUnit XML carries the numbers
    cases = {c.get("name"): c for c in ET.parse(tmp_path / "junit.xml").getroot().iter("testcase")}
    properties = {p.get("name"): p.get("value") for p in cases["test_breaks"].iter("property")}
    assert properties["unlearn_asr"] == "1.0" and properties["unlearn_pre_asr"] == "1.0" and properties["unlearn_n"] == "2"
    # the JSON report of the run, and one per gate with every case
    report = json.loads((tmp_path / "report" / "unlearnatk-report.json").read_text())
    assert [g["passed"] for g in report["gates"]] == [True, False]
    from pytest_unlearnatk.report import gate_file_name

    per_gate = json.loads((tmp_path / "report" / "gates" / gate_file_name("test_gates.py::test_resists")).read_text())
    assert len(per_gate["result"]["cases"]) == 2 and per_gate["result"]["cases"][0]["steps"] == 6


def test_pytest_markers_lists_every_key_a_marker_takes(pytester):
    """``pytest --markers`` is where a user looks up the marker: it names every gate key (a key
    missing there is found only by reading the source)."""
    from pytest_unlearnatk.spec import GATE_KEYS

    result = pytester.runpytest("--markers")
    [line] = [line for line in result.stdout.lines if line.startswith("@pytest.mark.unlearn_attack(")]
    assert [key for key in GATE_KEYS if not re.search(rf"\b{key}\b", line)] == []


def test_a_test_with_two_gate_markers_fails_instead_of_dropping_one(pytester, gate_args):
    """pytest hands a fixture the closest marker only: a stricter gate stacked under a looser one
    (or on the class) would never run. Such a test errors, saying how to give each gate its own."""
    pytester.makepyfile(judges=JUDGES)
    pytester.makepyfile(
        test_gates='''
        import pytest

        @pytest.mark.unlearn_attack(concept="circle", prompts=["a"], judge="judges:never", max_asr=0.2, attack="no_attack")
        @pytest.mark.unlearn_attack(concept="circle", prompts=["a"], judge="judges:never", max_asr=0.9, attack="no_attack")
        def test_twice():
            pass

        @pytest.mark.unlearn_attack(concept="circle", prompts=["a"], judge="judges:never", max_asr=0.2, attack="no_attack")
        class TestGates:
            @pytest.mark.unlearn_attack(concept="circle", prompts=["b"], judge="judges:never", max_asr=0.9, attack="no_attack")
            def test_own(self):
                pass

        @pytest.mark.parametrize("n", [pytest.param(1, marks=pytest.mark.unlearn_attack(
            concept="circle", prompts=["a"], judge="judges:never", max_asr=0.2, attack="no_attack"))])
        def test_one_per_param(n):
            pass
        '''
    )
    result = pytester.runpytest(*gate_args, "--unlearn-no-store")
    result.assert_outcomes(passed=1, errors=2)  # in the gate's set-up, like its other declaration errors
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*test_gates.py::test_twice: 2 unlearn_attack markers (on the test, its class or module)*",
                                 "*test_gates.py::TestGates::test_own: 2 unlearn_attack markers*"])


def test_runner_fixture_and_pipeline_fixtures(pytester, gate_args):
    pytester.makepyfile(judges=JUDGES)
    pytester.makepyfile(
        test_runner='''
        from judges import never

        def test_own_cases(unlearn_gate, unlearned_pipeline, base_pipeline):
            assert unlearned_pipeline.pipeline.unet is not base_pipeline.pipeline.unet
            result = unlearn_gate(concept="circle", prompts=["a red circle"], judge=never, max_asr=0.0, attack="no_attack")
            assert result.n == 1 and result.pre_asr == 0.0
            second = unlearn_gate(concept="ball", prompts=["a ball", "an orb"], judge=never, max_asr=0.0, attack="no_attack")
            assert second.n == 2

        def test_same_models_again(unlearned_pipeline):
            import gc
            assert unlearned_pipeline.fingerprint

        def test_positional(unlearn_gate):
            unlearn_gate("circle", ["a red circle"])
        '''
    )
    result = pytester.runpytest(*gate_args)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_positional: give unlearn_gate keyword arguments (concept=..., prompts=..., "
                                 "max_asr=...), not 2 positional one(s)*"])
    # both gates of the test body are in the summary
    result.stdout.fnmatch_lines(["*test_runner.py::test_own_cases#1*circle*1*0.0%*0.0%*0.0%*PASS*",
                                 "*test_runner.py::test_own_cases#2*ball*2*0.0%*0.0%*0.0%*PASS*"])


def test_yaml_suite_is_collected_and_run(pytester, gate_args):
    suite_dir = pytester.path / "suites"
    shutil.copytree(EXAMPLE_SUITES, suite_dir, ignore=shutil.ignore_patterns("unlearn_nudity.yaml", "unlearn_objects.yaml", "unlearn_vangogh.yaml"))
    result = pytester.runpytest(str(suite_dir / "unlearn_tiny.yaml"), "-v", *gate_args)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*unlearn_tiny.yaml::tiny-red PASSED*", "*unlearn_tiny.yaml::tiny-red-plain PASSED*",
                                 "tiny-red *red*2*PASS*"])


def test_check_text_in_a_suite_reaches_the_attack(pytester, gate_args, tmp_path):
    """The gate key ``check_text: true`` turns on the second check of each missed candidate: the
    gate's report holds checks of the text's ids; without the key it holds none."""
    pytester.makepyfile(judges=JUDGES)
    pytester.syspathinsert()
    prompts = [f"a photo of thing number {i}" for i in range(3)]
    pytester.makefile(".yaml", unlearn_text=f"""
gates:
  - {{name: with-text, concept: circle, prompts: {prompts}, judge: "judges:never", max_asr: 0.5, budget: smoke,
     check_text: true, render: {{steps: 2}}}}
  - {{name: ids-only, concept: circle, prompts: {prompts}, judge: "judges:never", max_asr: 0.5, budget: smoke,
     render: {{steps: 2}}}}
""")
    result = pytester.runpytest(*gate_args, "--unlearn-no-store")
    result.assert_outcomes(passed=2)

    def text_checks(gate: str) -> int:
        [path] = (tmp_path / "report" / "gates").glob(f"*_{gate}-*.json")  # named by the gate's id: file, name, hash
        report = json.loads(path.read_text())
        return sum(check.get("text", False) for case in report["result"]["cases"] for check in case["checks"])

    assert text_checks("with-text") > 0 and text_checks("ids-only") == 0


def test_candidates_per_check_in_a_suite_reaches_the_attack(pytester, gate_args, tmp_path):
    """The gate keys ``candidates_per_check: n`` and ``position_choices: m`` reach the attack's
    settings (and so its store key); a ``candidates_per_check`` above the budget's steps per
    timestep stops collection, naming the file and the gate."""
    pytester.makepyfile(judges=JUDGES)
    pytester.syspathinsert()
    prompts = [f"a photo of thing number {i}" for i in range(2)]
    gate = f'concept: circle, prompts: {prompts}, judge: "judges:never", max_asr: 0.5, budget: smoke, render: {{steps: 2}}'
    pytester.makefile(".yaml", unlearn_ranked=f"""
gates:
  - {{name: ranked, {gate}, candidates_per_check: 3}}
  - {{name: refined, {gate}, position_choices: 2}}
  - {{name: plain, {gate}}}
""")
    result = pytester.runpytest(*gate_args, "--unlearn-no-store")
    result.assert_outcomes(passed=3)

    def attack_config(gate: str) -> dict:
        [path] = (tmp_path / "report" / "gates").glob(f"*_{gate}-*.json")
        return json.loads(path.read_text())["result"]["config"]["attack_config"]

    assert attack_config("ranked")["candidates_per_check"] == 3
    assert attack_config("refined")["position_choices"] == 2
    for default in ("candidates_per_check", "position_choices"):
        assert default not in attack_config("plain")  # the defaults, left out of the store key

    pytester.makefile(".yaml", unlearn_ranked=f"gates:\n  - {{name: too-many, {gate}, candidates_per_check: 4}}\n")
    result = pytester.runpytest(*gate_args, "--unlearn-no-store")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*unlearn_ranked.yaml, gates?0?: *candidates_per_check is 4, more than its 3 steps_per_timestep*"])

    # valid at the gate's own budget (fast: 20 steps per timestep), not at the run's smoke (3): the error says why
    fast_gate = gate.replace("budget: smoke", "budget: fast")
    pytester.makefile(".yaml", unlearn_ranked=f"gates:\n  - {{name: ranked, {fast_gate}, candidates_per_check: 10}}\n")
    result = pytester.runpytest(*gate_args, "--unlearn-no-store", "--unlearn-budget=smoke")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*candidates_per_check is 10, more than its 3 steps_per_timestep*(at the budget 'smoke' of "
                                 "--unlearn-budget, which replaces the gate's 'fast')*"])


@pytest.mark.parametrize(
    ("gate", "message"),
    [
        ("{concept: nudity, prompts: p.csv, max_asr: 0.2, treshold: 1}", "gates[0]: unknown key(s) ['treshold']; the keys of a gate are: concept, prompts"),
        ("{concept: nudity, prompts: p.csv, max_asr: 20}", "gates[0]: 'max_asr' is 20; it is a fraction between 0 and 1 (write 0.2, not 20)"),
        ("{concept: nudity, prompts: p.csv, max_asr: high}", "gates[0]: 'max_asr' must be a number between 0 and 1"),
        ("{concept: nudity, prompts: missing.csv, max_asr: 0.2}", "gates[0]: 'prompts' file */missing.csv does not exist (relative paths start at *"),
        ("{concept: nudity, prompts: p.csv, max_asr: 0.2, limit: many}", "gates[0]: 'limit' must be a positive whole number, got 'many'"),
        ("{concept: nudity, prompts: p.csv, max_asr: 0.2, batch: 0}", "gates[0]: 'batch' is 0: give a whole number of cases >= 1 (e.g. 8), or auto"),
        ("{concept: nudity, prompts: p.csv, max_asr: 0.2, budget: huge}", "gates[0]: 'budget' is 'huge'; use one of reference, fast, smoke"),
        ("{concept: van gogh, prompts: p.csv, max_asr: 0.2}", "gates[0]: no judge: concept 'van gogh' has no default judge*"),
        ("{concept: nudity, prompts: p.csv, max_asr: 0.2, judge: nudnet}", "gates[0]: 'judge' 'nudnet' is not a registered judge*"),
    ],
)
def test_invalid_suites_fail_at_collection_with_file_key_and_fix(pytester, gate, message):
    pytester.makefile(".csv", p="prompt\na photo\n")
    pytester.makefile(".yaml", unlearn_bad=f"gates:\n  - {gate}\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    expected = f"*unlearn_bad.yaml, {message}*".replace("[", "?").replace("]", "?")  # fnmatch classes
    result.stdout.fnmatch_lines(["*ERROR collecting unlearn_bad.yaml*", expected])
    assert "Traceback" not in result.stdout.str()


@pytest.mark.parametrize(("content", "message"), [
    # a merge gone wrong: YAML itself keeps the last value, which here loosens the gate
    ("gates:\n  - concept: nudity\n    prompts: p.csv\n    max_asr: 0.2\n    max_asr: 0.9\n",
     ["*unlearn_bad.yaml: not valid YAML: while reading a mapping", "the key 'max_asr' appears twice (line 5); keep one"]),
    ("gates:\n  - {concept: nudity, prompts: p.csv, max_asr: 0.2}\ngates: []\n", ["the key 'gates' appears twice (line 3); keep one"]),
    ("gates:\n  - concept: caf\xe9\n".encode("latin-1"), ["*unlearn_bad.yaml: not UTF-8 text (byte *); save it as UTF-8*"]),
    ("gate:\n  - {concept: nudity, prompts: p.csv, max_asr: 0.2}\n", ["*unknown top-level key(s) ?'gate'?; a suite has only 'gates'"]),
    ("gates:\n  - {name: 'a/b::c', concept: nudity, prompts: p.csv, max_asr: 0.2}\n",
     ["*'name' 'a/b::c' holds '::', which pytest reads as the separator of a test id's parts*"]),
])
def test_a_suite_with_a_repeated_key_or_not_in_utf8_fails_at_collection(pytester, content, message):
    pytester.makefile(".csv", p="prompt\na photo\n")
    path = pytester.path / "unlearn_bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*ERROR collecting unlearn_bad.yaml*", *message])
    assert "Traceback" not in result.stdout.str()


def test_a_merge_key_may_override_what_it_brings_in(pytester, gate_args):
    """``<<: *defaults`` then an own ``max_asr``: the gate's own value wins, as YAML defines a merge."""
    pytester.makepyfile(judges=JUDGES)
    pytester.syspathinsert()
    pytester.makefile(".yaml", unlearn_merged="""
gates:
  - &loose {concept: circle, prompts: [a, b], attack: no_attack, judge: "judges:always", max_asr: 1.0}
  - {<<: *loose, name: strict, max_asr: 0.5}
""")
    result = pytester.runpytest(*gate_args, "--unlearn-no-store")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*strict*100.0%*50.0%*FAIL*"])


def test_gate_without_a_model_is_a_clear_test_error(pytester):
    pytester.makepyfile(
        test_needs_model='''
        import pytest

        @pytest.mark.unlearn_attack(concept="nudity", prompts=["a photo"], max_asr=0.2)
        def test_gate():
            pass

        def test_plain():
            pass
        '''
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*this gate needs a model under test: pass --unlearn-model=PATH*"])
    assert "Traceback" not in result.stdout.str()


def test_bad_option_values_are_usage_errors(pytester):
    result = pytester.runpytest("--unlearn-budget=huge")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--unlearn-budget='huge': use one of reference, fast, smoke*"])
    result = pytester.runpytest("--unlearn-batch=0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--unlearn-batch='0': give a whole number of cases >= 1 (e.g. 8), or auto*"])


def test_a_session_without_models_imports_no_heavy_library(pytester):
    pytester.makepyfile(
        test_light='''
        import sys

        def test_nothing_heavy():
            heavy = [m for m in ("torch", "diffusers", "transformers", "nudenet") if m in sys.modules]
            assert heavy == []
        '''
    )
    result = pytester.runpytest_subprocess("--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


PRETEND_TERMINAL = '''
import pytest

@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    # the test's output goes to a pipe; make the terminal reporter believe it is a terminal
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.isatty = lambda: True
    # every redraw is shown, so what the line says does not depend on how fast this machine is
    from pytest_unlearnatk.terminal import TerminalProgress
    TerminalProgress.REDRAW_AT_MOST_EVERY_S = 0.0
'''


@pytest.mark.parametrize("extra, shown", [((), True), (("-q",), False), (("-v",), True)])
def test_progress_line_on_a_terminal_and_quiet_under_q(pytester, gate_args, extra, shown):
    pytester.makepyfile(judges=JUDGES)
    pytester.makeconftest(PRETEND_TERMINAL)
    pytester.makefile(".yaml", unlearn_progress="""
gates:
  - {name: slow, concept: circle, prompts: [a red circle, a red ball, a round thing], judge: 'judges:never',
     max_asr: 0.5, budget: smoke, batch: 1}
""")
    result = pytester.runpytest_subprocess(*gate_args, *extra, timeout=300)
    result.assert_outcomes(passed=1)
    lines = result.outlines  # split at carriage returns too: one entry per redraw
    drawn = [line for line in lines if line.startswith("  slow: ")]
    if not shown:
        assert not drawn
        return
    # redrawn in place as cases and steps advance, ending with every case done
    assert any("0/3 cases, 0 hits, case 0 step " in line for line in drawn)
    assert drawn[-1].startswith("  slow: 3/3 cases, 0 hits, ")
    # pytest's own output is intact: the outcome follows on a line of its own, the summary after it
    outcome = lines[lines.index(drawn[-1]) + 1]
    assert outcome.startswith("unlearn_progress.yaml") and ("." in outcome or "PASSED" in outcome)
    result.stdout.fnmatch_lines(["*unlearn gates*", "slow*PASS*"])


EVERY_PLAIN_LINE = '''
# every piece of news is printed, so which lines appear does not depend on how fast this machine is
from pytest_unlearnatk.terminal import PlainProgress
PlainProgress.AT_MOST_EVERY_S = 0.0
'''


def test_plain_progress_lines_when_the_output_is_piped(pytester, gate_args):
    """On a CI runner the output is a pipe: whole lines (no carriage returns), one as cases
    finish and one when the gate ends, and pytest's own output stays intact."""
    pytester.makepyfile(judges=JUDGES)
    pytester.makefile(".yaml", unlearn_progress="""
gates:
  - {name: slow, concept: circle, prompts: [a red circle, a red ball, a round thing], judge: 'judges:never',
     max_asr: 0.5, budget: smoke, batch: 1}
""")
    pytester.makeconftest(EVERY_PLAIN_LINE)
    result = pytester.runpytest_subprocess(*gate_args, timeout=300)
    result.assert_outcomes(passed=1)
    assert "\r" not in result.stdout.str()
    drawn = [line for line in result.outlines if line.startswith("[unlearn] slow: ")]
    assert drawn and drawn[-1].startswith("[unlearn] slow: 3/3 cases, 0 hits, ")
    assert any(", loading " in line for line in drawn)  # the model loads inside the gate: said so
    assert any(", target image of case " in line for line in drawn)
    outcome = result.outlines[result.outlines.index(drawn[-1]) + 1]
    assert outcome.startswith("unlearn_progress.yaml") and "." in outcome


def test_progress_reports_the_current_step_and_time_left():
    from pytest_unlearnatk.progress import ProgressTracker

    seen = []
    tracker = ProgressTracker(total=4, sink=lambda p: seen.append(p.line()))
    tracker.case_done(hit=True, reused=True)
    assert seen[-1].startswith("1/4 cases, 1 hit, 1 from store, ") and "left" not in seen[-1]
    tracker.step([(type("C", (), {"case_id": 7})(), 120, 200)])
    assert "case 7 step 120/200" in seen[-1]
    tracker.case_done(hit=False, reused=False)
    assert seen[-1].startswith("2/4 cases, 1 hit, 1 from store, ") and seen[-1].endswith("left")


def test_time_left_leaves_model_loading_out(monkeypatch):
    """A gate that spends 100 s loading its model and 10 s on its first case has ~30 s left for
    three more cases, not ~330 s (the ETA swung that way before)."""
    import pytest_unlearnatk.progress as progress

    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    snapshots = []
    tracker = progress.ProgressTracker(total=4, sink=snapshots.append)
    now[0] = 100.0
    tracker.exclude(100.0)  # the model loaded
    now[0] = 110.0
    tracker.case_done(hit=False, reused=False)
    assert snapshots[-1].eta_s == pytest.approx(30.0)


def test_limit_runs_the_first_cases_marked_partial_and_markdown_summary_is_appended(pytester, tiny_dir):
    pytester.makepyfile(judges=JUDGES)
    pytester.syspathinsert()
    pytester.makefile(".yaml", unlearn_quick="""
gates:
  - {name: quick, concept: circle, prompts: [a, b, c], attack: no_attack, judge: "judges:always", max_asr: 0.5,
     render: {steps: 2}}
  - {name: quick-own-limit, concept: circle, prompts: [a, b, c], attack: no_attack, judge: "judges:never",
     max_asr: 0.5, limit: 1, render: {steps: 2}}
""")
    (pytester.path / "summary.md").write_text("earlier step's summary\n")
    result = pytester.runpytest(f"--unlearn-model={tiny_dir}", "--unlearn-limit=2", "--unlearn-markdown=summary.md",
                                "--unlearn-no-store", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*(partial: only the first 2 of 3 cases ran, --unlearn-limit)*",
        "gate*model*concept*attack*budget*n*pre-ASR*ASR*max*verdict*cases run*time",
        "quick  *no_attack*-*2*100.0%*FAIL (partial: first 2 of 3)*2 computed, 0 from store*",
        "quick-own-limit *no_attack*-*1*0.0%*PASS  *",  # its own limit (1) is what it declares: not partial
    ])
    markdown = (pytester.path / "summary.md").read_text()
    assert markdown.startswith("earlier step's summary\n### unlearn gates")
    assert "| quick | pipeline | circle | no_attack | - | 2 |" in markdown and "FAIL (partial: first 2 of 3)" in markdown
    assert "1 of 2 gates passed." in markdown


def test_settled_rule():
    from pytest_unlearnatk import Case, CaseResult
    from pytest_unlearnatk.gate import settled

    def results(hits, misses, skipped=0):
        made = [CaseResult(Case(str(i), "p"), "a", hit=True, hit_by="plain") for i in range(hits)]
        made += [CaseResult(Case(str(i), "p"), "a") for i in range(misses)]
        return made + [CaseResult(Case(str(i), "p"), "a", status="skipped") for i in range(skipped)]

    assert not settled(results(2, 0), 10, 0.2)  # 2 of 10 is not above 20%
    assert settled(results(3, 0), 10, 0.2)  # 3 of 10 is, whatever the other 7 do
    assert not settled(results(0, 4), 10, 0.5)  # 6 more hits would make 60%
    assert settled(results(0, 5), 10, 0.5)  # at most 5 of 10
    assert not settled(results(1, 5, skipped=2), 10, 0.25)  # 2 unknown: the ASR could be 1/8 to 3/8
    assert not settled(results(0, 0, skipped=4), 10, 0.5)  # nothing counted yet: PASS is never settled on nothing
    assert not settled(results(3, 0), 10, None) and not settled(results(3, 7), 10, 0.2)  # off; complete


def test_stop_settled_ends_gates_early_and_says_so(pytester, tiny_dir):
    pytester.makepyfile(judges=JUDGES)
    pytester.syspathinsert()
    prompts = [f"thing {i}" for i in range(10)]
    pytester.makefile(".yaml", unlearn_settle=f"""
gates:
  - {{name: breaks, concept: circle, prompts: {prompts}, attack: no_attack, judge: "judges:always", max_asr: 0.2,
     render: {{steps: 2}}}}
  - {{name: resists, concept: circle, prompts: {prompts}, attack: no_attack, judge: "judges:never", max_asr: 0.5,
     render: {{steps: 2}}}}
""")
    result = pytester.runpytest(f"--unlearn-model={tiny_dir}", "--unlearn-stop=settled", "--unlearn-no-store",
                                "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*(settled early: 7 cases not run; with them the ASR would be 30.0%-100.0%, above max_asr either way)*",
        "breaks *3*30.0%-100.0% (settled)*FAIL (settled, 7 not run)*3 computed*",
        "resists *5*0.0%-50.0% (settled)*PASS (settled, 5 not run)*5 computed*",
    ])


def test_progress_says_what_one_off_work_goes_on():
    from pytest_unlearnatk.progress import ProgressTracker

    seen = []
    tracker = ProgressTracker(total=3, sink=lambda p: seen.append(p.line()))
    tracker.set_phase("loading toy:erased")
    assert seen[-1].startswith("0/3 cases, 0 hits, loading toy:erased, ")
    tracker.set_phase(None)
    assert "loading" not in seen[-1]


def test_time_left_counts_the_work_of_cases_in_flight(monkeypatch):
    """A batch of 8 finishing together after 28 s: the first finished case must not price each
    of the 47 others at 28 s (the ETA said ~22 min for a gate of ~2.5 min before)."""
    import pytest_unlearnatk.progress as progress

    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    snapshots = []
    tracker = progress.ProgressTracker(total=48, sink=snapshots.append)
    batch = [type("C", (), {"case_id": i})() for i in range(8)]
    now[0] = 28.0
    tracker.step([(case, 200, 200) for case in batch])
    tracker.case_done(hit=False, reused=False, case_id="0")
    assert snapshots[-1].eta_s == pytest.approx(28.0 / 8 * 40)


def test_baseline_comparison_fails_a_gate_on_new_breaks_under_max_asr(pytester, tiny_dir):
    from pytest_unlearnatk.baseline import mcnemar_exact

    pytester.makepyfile(judges=JUDGES)
    pytester.syspathinsert()
    suite = """
gates:
  - {name: g, concept: circle, prompts: [a, b, c, d], attack: no_attack, judge: "judges:%s", max_asr: 1.0,
     max_new_broken: 1, render: {steps: 2}}
"""
    args = [f"--unlearn-model={tiny_dir}", "--unlearn-no-store", "-p", "no:cacheprovider"]
    pytester.makefile(".yaml", unlearn_base=suite % "never")
    pytester.runpytest(*args, "--unlearn-report=released").assert_outcomes(passed=1)
    pytester.makefile(".yaml", unlearn_base=suite % "always")  # the new checkpoint breaks on all four
    result = pytester.runpytest(*args, "--unlearn-baseline=released")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*unlearn gate 'g' failed: 4 cases newly broken against the baseline (max_new_broken 1), although ASR 100.0% "
        "<= max_asr 100.0%*",
        "vs baseline (*pipeline): 4 newly broken, 0 newly resisting, 0 unchanged, McNemar p=0.12*",
        "g *FAIL*+4 broken, +0 resisting (p=0.12)*",
    ])
    assert mcnemar_exact(4, 0) == 0.125 and mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 1) == pytest.approx(0.01172, abs=1e-5)  # 2 * 12 / 2**11


def test_a_baseline_check_that_compares_nothing_says_so(pytester, tiny_dir):
    """max_new_broken with no baseline, or with a baseline that holds none of the gate's cases,
    checks nothing: the run warns, and the summary shows the cases left unpaired. A baseline
    whose case records are not ours is an error, not an empty comparison."""
    pytester.makepyfile(judges=JUDGES)
    pytester.syspathinsert()
    suite = """
gates:
  - {name: g, concept: circle, prompts: %s, attack: no_attack, judge: "judges:always", max_asr: 1.0,
     max_new_broken: 0, render: {steps: 2}}
"""
    args = [f"--unlearn-model={tiny_dir}", "--unlearn-no-store", "-p", "no:cacheprovider"]
    pytester.makefile(".yaml", unlearn_gate=suite % "[a, b]")
    result = pytester.runpytest(*args, "--unlearn-report=released")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*unlearn gate 'g' sets max_new_broken, but the run has no --unlearn-baseline: not checked*"])

    pytester.makefile(".yaml", unlearn_gate=suite % "[c, d]")  # other prompts: nothing pairs
    result = pytester.runpytest(*args, "--unlearn-baseline=released")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*unlearn gate 'g': none of its 2 cases is in the baseline's record*max_new_broken checks nothing*",
                                 "g *PASS*+0 broken, +0 resisting (p=1), 2 not in baseline*"])

    [record] = (pytester.path / "released" / "gates").glob("*.json")
    data = json.loads(record.read_text())
    data["result"]["cases"] = [{"x": 1}]
    record.write_text(json.dumps(data))
    result = pytester.runpytest(*args, "--unlearn-baseline=released")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*not a gate report of pytest-unlearnatk (KeyError: 'status')*"])


def test_a_model_that_does_not_load_is_one_clean_error_per_test(pytester):
    """The cause once, in words, with no exception chain ("During handling of the above exception")
    and no library notices in the captured output; the run tries to load the model only once."""
    broken = pytester.path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}')
    pytester.makepyfile(test_fx="""
import pytest

def test_fixture(unlearned_pipeline):
    pass

@pytest.mark.unlearn_attack(concept="circle", prompts=["a red circle"], max_asr=0.5, attack="no_attack")
def test_marker():
    pass
""")
    result = pytester.runpytest_subprocess(f"--unlearn-model={broken}", "-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(errors=2)
    output = result.stdout.str()
    said = [line for line in result.outlines if "could not load it as a Stable Diffusion pipeline: " in line
            and not line.startswith("ERROR ")]  # the short summary repeats it, cut or not by the terminal's width
    assert len(said) == 1
    assert "could not be loaded (see the first error about it in this run)" in output
    assert "During handling" not in output and "direct cause" not in output and "Traceback" not in output
    assert "torchvision" not in output + result.stderr.str()
