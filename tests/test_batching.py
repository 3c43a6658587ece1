"""The batch loop's bookkeeping, without a model: which case runs in which row of which shape.

CPU kernels round a batch's rows differently by where they sit (a matrix product's last rows go
through another inner loop) and by the shape of the call, so a case's numbers stay the same only
if its rows and shapes do: places that come free take the next cases in order, the calls shrink
to the places still taken once no case is left, and a resumed run gives the cases it took from the
store their places in turn, for as long as they ran, so each other case gets the same place and
shapes as in an uninterrupted run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pytest_unlearnatk import UnlearnAtkError
from pytest_unlearnatk.attacks.base import AttackJob, AttackOutcome
from pytest_unlearnatk.attacks.batching import PlacedBatch
from pytest_unlearnatk.cases import Case

CONTEXT = SimpleNamespace(model=SimpleNamespace(pipeline=object()))  # the loop only checks it is one model


def steps_of(number: int) -> int:
    return 1 + number % 3


class RowRecorder(PlacedBatch):
    """Case ``n`` (its case id) runs ``steps_of(n)`` steps; each step records the place of each row
    of the model call and the case there (``None``: a filler row), and how many jobs were read so
    far. Like the attacks, it stacks its per-row state in the hooks and checks each step uses
    state stacked for the current rows."""

    max_steps = 3

    def __init__(self, jobs, batch_size, case_count=None):
        super().__init__(jobs, batch_size, None, case_count)
        self.steps: list[tuple[list[int | None], int]] = []
        self.stacked_rows: list[int] | None = None

    def _setup(self, context):
        self.pipeline = context.model.pipeline

    def _new_slot(self, job):
        return SimpleNamespace(job=job, outcome=AttackOutcome(), step_in_block=0, place=None)

    def _restack(self):
        self.stacked_rows = list(self.row_places)

    def _joined(self, added):
        self._restack()

    def _left(self, keep):
        self._restack()

    def _rows_changed(self):
        self._restack()

    def _step(self):
        live = {slot.place: int(slot.job.case.case_id) for slot in self.slots}
        rows = self.padded(self.slots)
        assert all(rows[self.row_of[slot.place]] is slot for slot in self.slots)
        assert self.stacked_rows == self.row_places  # a hook restacked after every change of rows
        self.steps.append(({place: live.get(place) for place in self.row_places}, self.jobs_read))

    def _block_ended(self, slot):
        return True

    def _end_blocks(self, ended):
        return [i for i in ended if self.slots[i].outcome.steps == steps_of(int(self.slots[i].job.case.case_id))]


def _run(numbers, batch_size=3, case_count=10, indexed=True, reused=None):
    """The loop over the cases ``numbers``; ``reused``: index -> steps of cases taken from the store."""
    reused = {} if reused is None else reused
    jobs = (AttackJob(Case(case_id=str(n), prompt=f"prompt {n}"), None, CONTEXT, index=n if indexed else None,
                      reused_steps=reused) for n in numbers)
    batch = RowRecorder(jobs, batch_size, case_count)
    finished = sorted(int(job.case.case_id) for job, _ in batch.run())
    return finished, batch.steps


def _places(steps):
    places: dict[int, set[int]] = {}
    for rows, _ in steps:
        for place, number in rows.items():
            if number is not None:
                places.setdefault(number, set()).add(place)
    return places


def _company(steps):
    """Each case's (number of rows, its row) at each of its steps: what its numbers depend on."""
    seen: dict[int, list[tuple[int, int]]] = {}
    for rows, _ in steps:
        for row, number in enumerate(rows.values()):
            if number is not None:
                seen.setdefault(number, []).append((len(rows), row))
    return seen


def test_each_case_keeps_one_place_for_all_its_steps():
    finished, steps = _run(range(10))
    assert finished == list(range(10))
    assert all(len(places) == 1 for places in _places(steps).values()) and len(_places(steps)) == 10
    assert all(len(company) == steps_of(n) for n, company in _company(steps).items())


def test_free_places_take_the_next_cases_lowest_place_first_and_calls_shrink_at_the_end():
    _, steps = _run(range(7), case_count=7)
    # case n runs 1 + n % 3 steps: after step 2, cases 1 and 3 end, places 0 and 1 take 4 and 5;
    # after step 4 no case is left for places 0 and 2, so the calls shrink to place 1
    assert [rows for rows, _ in steps] == [
        {0: 0, 1: 1, 2: 2}, {0: 3, 1: 1, 2: 2}, {0: 4, 1: 5, 2: 2}, {0: 4, 1: 5, 2: 6}, {1: 5}]
    assert [read for _, read in steps][:3] == [3, 4, 6]  # jobs are read only as far as a free place needs


def test_a_resumed_run_gives_each_case_the_shapes_and_rows_of_an_uninterrupted_one():
    _, whole = _run(range(10))
    resumed_cases = [3, 5, 6, 7, 8, 9]  # cases 0, 1, 2 and 4 were done before the interruption
    reused = {n: steps_of(n) for n in (0, 1, 2, 4)}
    finished, resumed = _run(resumed_cases, reused=reused)
    assert finished == resumed_cases
    expected = {n: rows for n, rows in _company(whole).items() if n in resumed_cases}
    assert _company(resumed) == expected
    # without the stays of the reused cases the calls would shrink sooner: other shapes
    _, forgetful = _run(resumed_cases)
    assert _company(forgetful) != expected
    assert any(len(rows) < 3 for rows, _ in whole)  # the calls did shrink


def test_reused_cases_after_the_last_job_and_without_steps_count():
    """A reused case after the last computed one still holds its place (the tail's shapes depend
    on it); a case the plain prompt broke (0 steps) never took a place."""
    _, whole = _run(range(10))
    reused = {n: steps_of(n) for n in (8, 9)} | {1: 0}
    _, resumed = _run([0, 2, 3, 4, 5, 6, 7], reused=reused)
    _, whole_without_1 = _run([n for n in range(10) if n != 1])
    expected = {n: rows for n, rows in _company(whole_without_1).items() if n <= 7}
    assert _company(resumed) == expected
    assert _company(whole) != _company(whole_without_1)  # the plain hit's place went to the next case


def test_only_reused_cases_hold_places_costs_no_steps():
    """While only reused cases hold places, the loop waits for none of their steps."""
    reused = {n: 3 for n in range(6)}
    finished, steps = _run([6], case_count=7, reused=reused)
    assert finished == [6]
    assert len(steps) == steps_of(6)


def test_jobs_without_an_index_take_places_in_the_order_they_arrive():
    _, steps = _run([0, 1, 2, 3], batch_size=2, indexed=False)
    assert _places(steps) == {0: {0}, 1: {1}, 2: {0}, 3: {1}}


def test_a_job_index_that_is_not_a_whole_number_is_a_clear_error():
    for bad in (-1, 1.5, "3"):
        jobs = iter([AttackJob(Case(case_id="7", prompt="p"), None, CONTEXT, index=bad)])
        with pytest.raises(UnlearnAtkError, match=r"job index .* \(case 7\): it must be .* whole number >= 0"):
            list(RowRecorder(jobs, 2).run())
