"""The store: reuse, replay, replay-only, corrupt files, kill -9 and resume, xdist workers, shards."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from pytest_unlearnatk import load_cases, run_gate
from pytest_unlearnatk.models import LazyModel
from pytest_unlearnatk.render import RenderSettings
from pytest_unlearnatk.store import Store, StoreWarning
from pytest_unlearnatk.testing import DiffersFromPlain

pytest_plugins = ["pytester"]
FAST_RENDER = RenderSettings(steps=3)
CASES = [
    {"case_number": 0, "prompt": "a red circle", "evaluation_seed": 1},
    {"case_number": 1, "prompt": "a photo of a church", "evaluation_seed": 2},
    {"case_number": 2, "prompt": "a blue square", "evaluation_seed": 3},
]


def never(images):
    return [False] * len(images)



def test_second_identical_run_does_no_model_work(tiny_dir, other_tiny_dir, tmp_path):
    store = Store(tmp_path / "store")
    first = run_gate(LazyModel(str(tiny_dir)), load_cases(CASES), never, budget="smoke",
                     base=LazyModel(str(other_tiny_dir)), render=FAST_RENDER, store=store)
    assert (first.computed, first.reused) == (3, 0)
    model, base = LazyModel(str(tiny_dir)), LazyModel(str(other_tiny_dir))
    second = run_gate(model, load_cases(CASES), never, budget="smoke", base=base, render=FAST_RENDER, store=store)
    assert (second.computed, second.reused) == (0, 3)
    assert not model.is_loaded and not base.is_loaded, "reusing stored results must not even load the models"
    assert (second.asr, second.pre_asr) == (first.asr, first.pre_asr)
    assert [c.adversarial_ids for c in second.cases] == [c.adversarial_ids for c in first.cases]
    # another budget is another key: computed again
    third = run_gate(LazyModel(str(tiny_dir)), load_cases(CASES[:1]), never, budget="smoke", n_tokens=3,
                     base=LazyModel(str(other_tiny_dir)), render=FAST_RENDER, store=store)
    assert third.computed == 1


def test_prompt_found_on_checkpoint_a_breaks_checkpoint_b_by_replay(tiny_dir, other_tiny_dir, tmp_path):
    store = Store(tmp_path / "store")
    found = run_gate(LazyModel(str(tiny_dir)), load_cases(CASES[:1]), DiffersFromPlain(), budget="smoke", concept="redness",
                     base=LazyModel(str(other_tiny_dir)), render=FAST_RENDER, store=store).cases[0]
    assert found.hit_by == "unlearndiffatk"
    stored_files = list((tmp_path / "store" / "prompts" / "redness").glob("*.json"))
    assert len(stored_files) == 1
    record = json.loads(stored_files[0].read_text())["prompt"]
    assert record["adversarial_ids"] == found.adversarial_ids and record["text"] == found.adversarial_text
    # checkpoint B: another model, same concept and case
    replayed = run_gate(LazyModel(str(other_tiny_dir)), load_cases(CASES[:1]), DiffersFromPlain(), budget="smoke",
                        concept="redness", base=LazyModel(str(tiny_dir)), render=FAST_RENDER, store=store).cases[0]
    assert replayed.hit and replayed.hit_by == "replay"
    assert replayed.steps == 0 and replayed.renders == 2  # plain prompt, then the replayed prompt
    assert replayed.adversarial_ids == found.adversarial_ids


def test_replay_only_runs_no_optimizer_step(tiny_dir, other_tiny_dir, tmp_path, monkeypatch):
    from pytest_unlearnatk.attacks.unlearndiffatk import UnlearnDiffAtk

    monkeypatch.setattr(UnlearnDiffAtk, "run", lambda *a, **k: pytest.fail("optimization ran under replay_only"))
    result = run_gate(LazyModel(str(tiny_dir)), load_cases(CASES), never, budget="smoke", render=FAST_RENDER,
                      store=Store(tmp_path / "store"), replay_only=True)
    assert result.replay_only and result.attack == "replay_only" and "lower bound" in result.summary()
    assert all(c.steps == 0 for c in result.cases)


def test_corrupt_store_file_is_a_warning_and_the_rest_is_used(tiny_dir, tmp_path):
    store = Store(tmp_path / "store")
    model = LazyModel(str(tiny_dir))
    run_gate(model, load_cases(CASES), never, attack="no_attack", render=FAST_RENDER, store=store)
    files = sorted((tmp_path / "store" / "results").rglob("*.json"))
    assert len(files) == 3
    files[0].write_text('{"format": 1, "kind": "case_re')  # a truncated write
    with pytest.warns(StoreWarning, match=f"{files[0]}: corrupt store file .* Delete it"):
        again = run_gate(model, load_cases(CASES), never, attack="no_attack", render=FAST_RENDER, store=store)
    assert (again.reused, again.computed) == (2, 1)
    json.loads(files[0].read_text())  # rewritten whole


def test_readonly_store_is_read_not_written(tiny_dir, tmp_path):
    model = LazyModel(str(tiny_dir))
    run_gate(model, load_cases(CASES[:1]), never, attack="no_attack", render=FAST_RENDER, store=Store(tmp_path / "s"))
    readonly = Store(tmp_path / "s", readonly=True)
    result = run_gate(model, load_cases(CASES), never, attack="no_attack", render=FAST_RENDER, store=readonly)
    assert (result.reused, result.computed) == (1, 2)
    assert len(list((tmp_path / "s" / "results").rglob("*.json"))) == 1


# --- through pytest: kill -9 and resume, xdist workers, shards ----------------------------------

SUITE = """
gates:
  - name: many
    concept: redness
    prompts: prompts.csv
    judge: judges:reddish
    max_asr: 0.5
    {attack}
"""
JUDGES = """
import os, signal
import numpy as np

def reddish(images):
    # deterministic image statistic, and on request a hard kill at the Nth image judged
    out = []
    for image in images:
        kill_at = os.environ.get("KILL_AT_JUDGE_CALL")
        if kill_at:
            count = int(os.environ.get("_JUDGE_CALLS", "0")) + 1
            os.environ["_JUDGE_CALLS"] = str(count)
            if count == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
        pixels = np.asarray(image, dtype=float)
        out.append(bool(pixels[..., 0].mean() > pixels[..., 2].mean()))
    return out
"""


def make_suite(pytester, tiny_dir, other_tiny_dir, attack: str, n_cases: int) -> Path:
    rows = "\n".join(f"{i},a shape number {i} in red,{i},7.5" for i in range(n_cases))
    pytester.makefile(".csv", prompts=f"case_number,prompt,evaluation_seed,evaluation_guidance\n{rows}\n")
    pytester.makepyfile(judges=JUDGES)
    pytester.makefile(".yaml", unlearn_suite=SUITE.format(attack=attack))
    pytester.makeini("[pytest]\nunlearn_model = %s\nunlearn_base = %s\n" % (tiny_dir, other_tiny_dir))
    return pytester.path


def _run(pytester, *args, env=None):
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--rootdir={pytester.path}", *args, timeout=400)
    finally:
        os.environ.clear()
        os.environ.update(old)


def _stored_results(store: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in (store / "results").rglob("*.json")}


def _gate_record(report_dir: Path) -> dict:
    return json.loads((report_dir / "unlearnatk-report.json").read_text())["gates"][0]


def test_killed_run_resumes_without_recomputing_finished_cases(pytester, tiny_dir, other_tiny_dir):
    suite_dir = make_suite(pytester, tiny_dir, other_tiny_dir, attack="budget: smoke", n_cases=6)
    full = _run(pytester, "--unlearn-store=full", "--unlearn-report=full-report")
    full.assert_outcomes(passed=1)  # reference: one uninterrupted run on its own store
    # kill -9 in the middle: two cases at a time, each judges its plain image and up to 2 candidates;
    # die at the 7th image, after the first two cases finished (a batch loses only the cases in flight)
    killed = _run(pytester, "--unlearn-store=store", "--unlearn-batch=2", env={"KILL_AT_JUDGE_CALL": "7"})
    assert killed.ret != 0
    finished = _stored_results(suite_dir / "store")
    assert 0 < len(finished) < 6
    resumed = _run(pytester, "--unlearn-store=store", "--unlearn-report=report")
    resumed.assert_outcomes(passed=1)
    record = _gate_record(suite_dir / "report")
    assert record["reused"] == len(finished) and record["computed"] == 6 - len(finished)
    expected = _gate_record(suite_dir / "full-report")
    assert (record["asr"], record["pre_asr"], record["passed"]) == (expected["asr"], expected["pre_asr"], expected["passed"])
    # finished cases were not rewritten: same content as before the rerun
    assert all(_stored_results(suite_dir / "store")[name] == content for name, content in finished.items())


def test_shards_then_aggregate_equal_one_full_run(pytester, tiny_dir, other_tiny_dir):
    suite_dir = make_suite(pytester, tiny_dir, other_tiny_dir, attack="attack: no_attack", n_cases=8)
    full = _run(pytester, "--unlearn-store=full", "--unlearn-report=full-report")
    full.assert_outcomes(passed=1)
    first = _run(pytester, "--unlearn-store=shared", "--unlearn-shard=1/2", "-rs")
    first.assert_outcomes(skipped=1)  # its slice only: no verdict yet
    first.stdout.fnmatch_lines(["*belong to other shards*"])
    assert 0 < len(_stored_results(suite_dir / "shared")) < 8
    second = _run(pytester, "--unlearn-store=shared", "--unlearn-shard=2/2")
    second.assert_outcomes(passed=1)  # with both slices in the store, this run has the verdict
    aggregate = _run(pytester, "--unlearn-store=shared", "--unlearn-report=report")
    aggregate.assert_outcomes(passed=1)
    record, expected = _gate_record(suite_dir / "report"), _gate_record(suite_dir / "full-report")
    assert record["computed"] == 0 and record["reused"] == 8
    assert (record["asr"], record["pre_asr"], record["n"]) == (expected["asr"], expected["pre_asr"], expected["n"])


@pytest.mark.skipif(sys.platform == "win32", reason="xdist over a shared directory is tested on POSIX")
def test_two_xdist_workers_share_one_store(pytester, tiny_dir, other_tiny_dir):
    pytest.importorskip("xdist")
    suite_dir = make_suite(pytester, tiny_dir, other_tiny_dir, attack="attack: no_attack", n_cases=8)
    # three gates over overlapping cases: workers write the same keys concurrently
    gates = "\n".join(
        f"  - {{name: g{i}, concept: redness, prompts: prompts.csv, judge: 'judges:reddish', max_asr: 1.0, "
        f"attack: no_attack, limit: {5 + i}}}"
        for i in range(4)
    )
    pytester.makefile(".yaml", unlearn_suite=f"gates:\n{gates}\n")
    for _ in range(3):
        result = _run(pytester, "-n", "2", "--unlearn-store=store")
        result.assert_outcomes(passed=4)
    stored = _stored_results(suite_dir / "store")  # every file parses
    assert len(stored) == 8  # one per distinct case, none lost
    assert all(record["kind"] == "case_result" for record in stored.values())
    assert not list((suite_dir / "store").rglob("*.tmp"))


def test_a_report_from_the_store_brings_its_images_and_says_which_are_missing(tiny_model, base_model, tmp_path):
    """The documented CI recipe: the store is cached or committed, each run writes a new report
    directory. Results reused from the store show the same images, from the store, in the new
    directory; an image the store lacks is a warning (and the page says "image missing")."""
    from pytest_unlearnatk.html_report import write_html_report
    from pytest_unlearnatk.report import GateRecord, write_gate_report

    store = Store(tmp_path / "store")

    def run(report: Path):
        return run_gate(tiny_model, load_cases(CASES[:2]), never, budget="smoke", base=base_model, render=FAST_RENDER,
                        store=store, image_dir=report / "images", concept="circle", batch_size=1)

    first = run(tmp_path / "first")
    kept = [result.images for result in first.cases]
    assert all(set(images) == {"target", "plain", "adversarial"} for images in kept)  # nothing broke: all three
    import shutil

    shutil.rmtree(tmp_path / "first")  # last run's report is gone (a CI workspace is fresh)
    second = run(tmp_path / "second")
    assert second.reused == 2 and [result.images for result in second.cases] == kept
    assert all((tmp_path / "second" / "images" / name).is_file() for images in kept for name in images.values())

    # a store without the images (written by an earlier version, or pruned): each is a warning
    shutil.rmtree(tmp_path / "store" / "images")
    with pytest.warns(StoreWarning) as caught:
        third = run(tmp_path / "third")
    said = sorted(str(w.message) for w in caught if issubclass(w.category, StoreWarning))
    assert len(said) == 2  # one warning per case, naming what is missing
    assert all(message.startswith(f"case {i}: images not in the store (adversarial, plain, target;")
               for i, message in enumerate(said))
    assert third.reused == 2 and not (tmp_path / "third" / "images").exists()
    write_gate_report(tmp_path / "third", GateRecord.from_result("g", "circle", "smoke", 0.5, third, 1.0), third)
    page = write_html_report(tmp_path / "third").read_text()
    assert page.count("image missing") == 6 and "6 images are missing" in page


def test_images_of_an_unsafe_concept_are_kept_blurred_unless_asked(tiny_model, tmp_path):
    from PIL import Image, ImageFilter

    def kept(**keywords):
        result = run_gate(tiny_model, ["a person"], never, attack="no_attack", render=FAST_RENDER,
                          image_dir=tmp_path, **keywords)
        return np.asarray(Image.open(tmp_path / result.cases[0].images["plain"]), dtype=float)

    shown = kept(concept="nudity", show_unsafe=True)
    assert np.array_equal(shown, kept(concept="circle"))  # a safe concept is never blurred
    blurred = kept(concept="nudity")
    again = Image.fromarray(shown.astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius=shown.shape[0] / 12))
    assert np.array_equal(blurred, np.asarray(again, dtype=float))  # the PNG file itself is blurred
    assert not np.array_equal(blurred, shown)
