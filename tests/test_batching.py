"""The batch loop's bookkeeping, without a model: which case runs in which row of the batch.

CPU kernels round a batch's rows differently by where they sit (a matrix product's last rows go
through another inner loop), so a case's numbers stay the same only if its row does: case i of a
gate runs at place i % batch_size, whichever cases were already done (a resumed run)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pytest_unlearnatk import UnlearnAtkError
from pytest_unlearnatk.attacks.base import AttackJob, AttackOutcome
from pytest_unlearnatk.attacks.batching import FixedShapeBatch
from pytest_unlearnatk.cases import Case

CONTEXT = SimpleNamespace(model=SimpleNamespace(pipeline=object()))  # the loop only checks it is one model


class RowRecorder(FixedShapeBatch):
    """Case ``n`` (its case id) runs ``1 + n % 3`` steps; each step records which case is in each
    row of the model call (``None``: a free place, padded) and how many jobs were read so far."""

    max_steps = 3

    def __init__(self, jobs, batch_size, case_count=None):
        super().__init__(jobs, batch_size, None, case_count)
        self.steps: list[tuple[list[int | None], int]] = []

    def _setup(self, context):
        self.pipeline = context.model.pipeline

    def _new_slot(self, job):
        return SimpleNamespace(job=job, outcome=AttackOutcome(), step_in_block=0, place=None)

    def _step(self):
        live = {slot.place: int(slot.job.case.case_id) for slot in self.slots}
        rows = self.padded(self.slots)
        assert all(rows[slot.place] is slot for slot in self.slots)
        self.steps.append(([live.get(place) for place in range(self.batch_size)], self.jobs_read))

    def _block_ended(self, slot):
        return True

    def _end_blocks(self, ended):
        return [i for i in ended if self.slots[i].outcome.steps == 1 + int(self.slots[i].job.case.case_id) % 3]


def _run(numbers, batch_size=3, case_count=10, indexed=True):
    jobs = (AttackJob(Case(case_id=str(n), prompt=f"prompt {n}"), None, CONTEXT, index=n if indexed else None)
            for n in numbers)
    batch = RowRecorder(jobs, batch_size, case_count)
    finished = sorted(int(job.case.case_id) for job, _ in batch.run())
    return finished, batch.steps


def _places(steps):
    places: dict[int, set[int]] = {}
    for rows, _ in steps:
        for place, number in enumerate(rows):
            if number is not None:
                places.setdefault(number, set()).add(place)
    return places


def test_each_case_runs_in_the_row_of_its_place_and_keeps_it_when_resumed():
    finished, steps = _run(range(10))
    assert finished == list(range(10))
    assert _places(steps) == {n: {n % 3} for n in range(10)}
    resumed = [3, 5, 6, 7, 8, 9]  # cases 0, 1, 2 and 4 were done before the interruption
    finished, steps = _run(resumed)
    assert finished == resumed
    assert _places(steps) == {n: {n % 3} for n in resumed}


def test_places_take_their_cases_in_order_and_jobs_are_read_only_as_far_as_needed():
    _, steps = _run(range(7), case_count=7)
    assert [rows for rows, _ in steps] == [
        [0, 1, 2], [3, 1, 2], [6, 4, 2], [None, 4, 5], [None, None, 5], [None, None, 5]]
    assert [read for _, read in steps][:2] == [3, 4]  # the first step read three jobs, the second one more


def test_jobs_without_an_index_take_places_in_the_order_they_arrive():
    _, steps = _run([0, 1, 2, 3], batch_size=2, indexed=False)
    assert _places(steps) == {0: {0}, 1: {1}, 2: {0}, 3: {1}}


def test_a_job_index_that_is_not_a_whole_number_is_a_clear_error():
    for bad in (-1, 1.5, "3"):
        jobs = iter([AttackJob(Case(case_id="7", prompt="p"), None, CONTEXT, index=bad)])
        with pytest.raises(UnlearnAtkError, match=r"job index .* \(case 7\): it must be .* whole number >= 0"):
            list(RowRecorder(jobs, 2).run())
