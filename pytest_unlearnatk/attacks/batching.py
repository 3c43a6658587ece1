"""Cases optimized together in a batch: the bookkeeping UnlearnDiffAtk, P4D and concept
inversion share.

A batch holds up to ``batch_size`` cases, one per place. Every step the attack runs its models
once for all of them, each case in the row of its place. CPU kernels do not compute every row
alike: a small matrix product's last rows go through another inner loop than its first, and round
differently (measured: a batch of six equal rows out of one ``Linear`` differs by 2e-7 between
rows), and a call of another shape can round differently too. So a case's numbers depend on the
shape of each call and on its row in it, never on what the other rows hold.

Both follow the gate's *timeline*: the steps of the batch since it started, as an uninterrupted
run of the gate takes them. When places come free (at the same step), they take the next cases in
the order of the gate, the lowest place first, and a case keeps its place to its end. While every
place is taken the model sees ``batch_size`` rows; towards the gate's end, when no case is left
for a free place, the calls shrink to the places still taken (rows in the order of the places), so
the last long cases do not drag padded rows along. A run that takes some cases from the store (a
resumed one) replays that timeline: a reused case (``AttackJob.reused_steps``) takes its place in
turn and holds it for the steps it took in the run that computed it (a copy of a live case fills
its row; no model work is spent while only reused cases hold places). So every case gets the
same place and sees the same shapes at each of its steps, and so the same numbers, whether or not
the run was interrupted (docs/performance.md, "What a case's result depends on"). A case's
success check is rendered in its row too, with the checks of the other cases whose block ended
at the same step (:meth:`PlacedBatch.check_many`).

:class:`PlacedBatch` is the loop; an attack subclasses it with its own slots and step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..cases import Case
from ..errors import UnlearnAtkError
from ..judges import Verdict
from ..render import NonFiniteError
from .base import AttackContext, AttackJob, AttackOutcome, BlockContext, Checker, StepCallback

AUTO_BATCH_MAX = {"cpu": 8, "gpu": 16}  # beyond these, batching gains little (docs/performance.md)
BYTES_PER_ACTIVATION_UNIT = 760  # float32, measured on the CPU: see case_memory_bytes
GPU_MEMORY_MARGIN = 4  # unmeasured on a GPU: leave room for kernels' workspaces and fragmentation


def case_memory_bytes(unet_config: Any, dtype_bytes: int = 4) -> int:
    """Estimated memory one more case adds to a batch: the activations its backward pass keeps.

    They scale with the UNet's top level: latent area x the first block's channels x (layers per
    block + 1). ``BYTES_PER_ACTIVATION_UNIT`` per such unit in float32 is what the medium
    SD-shaped pipeline measured on the CPU (benchmarks/memory.py: 0.35 GiB per case at 256 px);
    the toy model measured twice its estimate (11 MB, not 6). SD v1.4 at 512 px comes out at
    2.8 GiB per case in float32, 1.4 GiB in float16.
    """
    def first(value: Any) -> int:
        return int(value[0] if isinstance(value, (list, tuple)) else value)

    size = unet_config["sample_size"]
    height, width = (size, size) if isinstance(size, int) else size
    units = height * width * first(unet_config["block_out_channels"]) * (first(unet_config["layers_per_block"]) + 1)
    return int(units * BYTES_PER_ACTIVATION_UNIT * dtype_bytes / 4)


def resolve_batch_size(batch_size: int | str | None, device: str, case_bytes: int | None = None) -> int:
    """``batch_size`` as a number. ``None``/``"auto"``: as many cases as free memory holds at
    ``case_bytes`` each (``case_memory_bytes``), at most ``AUTO_BATCH_MAX`` (the CPU: half the
    available RAM; a GPU: its free memory, with a 4x margin: about 6 GiB per case for SD v1.4 in
    float16); at least 1. Without ``case_bytes`` the automatic size is the maximum."""
    from ..options import parse_batch

    try:
        batch_size = parse_batch(batch_size)
    except ValueError as error:
        raise UnlearnAtkError(f"batch size {batch_size!r}: {error}") from None
    if batch_size is None:
        if device.startswith("cuda"):
            import torch

            free, _ = torch.cuda.mem_get_info(torch.device(device))
            most, room, per_case = AUTO_BATCH_MAX["gpu"], free, GPU_MEMORY_MARGIN * (case_bytes or 0)
        else:
            import psutil

            most, room, per_case = AUTO_BATCH_MAX["cpu"], psutil.virtual_memory().available / 2, case_bytes or 0
        return max(1, min(most, int(room / per_case))) if per_case else most
    return batch_size


def finite_losses(losses: list[Any], attack: str, case: Case, last_step: int, loss_name: str = "loss",
                  where: str = "") -> list[float]:
    """A block's per-step losses (0-d tensors, the last at step ``last_step``) as floats; a NaN or
    infinite one raises :class:`NonFiniteError` naming the case and the step: no verdict can be
    given on a broken model. One host transfer per block, not per step."""
    import torch

    values = torch.stack(losses).tolist()
    bad = [i for i, loss in enumerate(values) if not math.isfinite(loss)]
    if bad:
        raise NonFiniteError(
            f"{attack} on case {case.case_id}: the {loss_name} is {values[bad[0]]} at step "
            f"{last_step - len(values) + bad[0] + 1}{where}: the model's weights or dtype are "
            "broken (in float16, try float32); no verdict can be given"
        )
    return values


@dataclass(frozen=True)
class _Reused:
    """A case of the gate whose result came from the store: it held its place for ``steps`` steps."""

    steps: int


class PlacedBatch:
    """The loop over a changing batch of cases (see the module's docstring).

    A subclass gives: ``max_steps``; ``_setup(context)`` (called on the first job: the model, and
    ``self.batch_size`` where it was "auto", see :meth:`_resolve_batch`); ``_new_slot(job)`` (an
    object with ``job``, ``outcome``, ``step_in_block`` and ``place``, which the loop sets);
    ``_step()`` (one step of every case); ``_block_ended(slot)``; ``_end_blocks(ended)`` (check
    those cases, return the finished ones, reset the others' ``step_in_block``). Optional hooks:
    ``_joined(added)`` and ``_left(keep)`` (the batch changed: restack per-batch state),
    ``_next_blocks()`` (cases ended a block and none finished), ``_rows_changed()`` (the rows of a
    model call changed and no case joined or left: restack per-row state), ``_enter(stack)``
    (contexts held while the batch runs).

    ``self.slots`` lists the cases in the order they joined; :meth:`padded`, :meth:`padded_rows`
    and :meth:`per_case` convert between that order and the rows of a model call (by place), and
    :meth:`check_many` renders checks at those rows. ``self.row_places`` lists the place of each
    row of the current calls.
    """

    max_steps: int

    def __init__(self, jobs: Iterator[AttackJob], batch_size: int | str | None, on_step: StepCallback | None,
                 case_count: int | None = None) -> None:
        self.jobs, self.on_step = jobs, on_step
        self.requested_batch, self.case_count = batch_size, case_count
        # an explicit size is checked at once; "auto" is decided once the model's device is known
        self.batch_size = None if batch_size in (None, "auto") else self._capped(resolve_batch_size(batch_size, "cpu"))
        self.slots: list[Any] = []
        self.pipeline: Any = None
        self.waiting: deque[AttackJob | _Reused] = deque()  # read ahead, in the order of the cases
        self.jobs_read = 0
        self.jobs_left = True
        self.clock = 0  # steps of the gate's timeline (see the module's docstring)
        self.held: dict[int, int] = {}  # place -> the step at which the stay of a reused case there ends
        self.reused: Mapping[int, int] = {}  # the gate's reused cases: index -> steps (AttackJob.reused_steps)
        self.reused_queued: set[int] = set()
        self.row_places: list[int] = []
        self.row_of: dict[int, int] = {}  # place -> its row

    def _capped(self, size: int) -> int:
        """No more places than the gate has cases (the shape must not depend on how many remain)."""
        return max(1, min(size, self.case_count)) if self.case_count else size

    def _resolve_batch(self, device: Any, case_bytes: int) -> None:
        self.batch_size = self._capped(resolve_batch_size(self.requested_batch, str(device), case_bytes))

    # --- rows of a model call, by place -------------------------------------------------------

    def padded(self, items: list[Any], filler: Any = None) -> list[Any]:
        """``items`` (one per case, in the order of ``self.slots``) as the rows of a model call: a
        row holds the item of the case at its place; a place held by a reused case ``filler``, by
        default the first item."""
        by_place = {slot.place: item for slot, item in zip(self.slots, items)}
        return [by_place.get(place, items[0] if filler is None else filler) for place in self.row_places]

    def padded_rows(self, pieces: list[Any]) -> Any:
        """Tensors (one per case, in the order of ``self.slots``) concatenated as the rows of a
        model call (see :meth:`padded`); a filler row's copy is detached: no gradient comes back
        from a dropped row."""
        import torch

        return torch.cat(self.padded(pieces, filler=pieces[0].detach()))

    def per_case(self, rows: Any) -> Any:
        """A model call's rows back in the order of ``self.slots``; filler rows dropped."""
        return rows[[self.row_of[slot.place] for slot in self.slots]]

    def check_many(self, requests: list[tuple[Checker, list[int]]], slot_indices: list[int],
                   around: BlockContext | None = None) -> list[tuple[Verdict, Any]]:
        """Render and judge the checks ``requests`` of the slots at ``slot_indices`` (one each), in
        one render of the current calls' rows per guidance value, each in the row of its case's
        place (:meth:`Checker.check_many`)."""
        return Checker.check_many(requests, rows=len(self.row_places), around=around,
                                  places=[self.row_of[self.slots[i].place] for i in slot_indices])

    # --- the batch's cases ------------------------------------------------------------------

    def _read_job(self) -> bool:
        """Queue one job, after the reused cases before it; False when the jobs ran out (the
        reused cases after the last job are queued then)."""
        job = next(self.jobs, None) if self.jobs_left else None
        if job is None:
            self.jobs_left = False
            self._queue_reused(None)
            return False
        if self.pipeline is None:
            self._setup(job.context)
        elif job.context.model.pipeline is not self.pipeline:
            raise UnlearnAtkError("all cases of one batch must attack the same model")
        index = self.jobs_read if job.index is None else job.index
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise UnlearnAtkError(f"job index {job.index!r} (case {job.case.case_id}): it must be the case's "
                                  "index in the list of cases, a whole number >= 0, or None")
        if job.index is not None:
            self.reused = job.reused_steps
            self._queue_reused(index)
        self.jobs_read += 1
        self.waiting.append(job)
        return True

    def _queue_reused(self, below: int | None) -> None:
        """Queue the reused cases not queued yet, up to index ``below`` (None: all)."""
        for index in sorted(i for i in self.reused if i not in self.reused_queued and (below is None or i < below)):
            self.reused_queued.add(index)
            steps = self.reused[index]
            if steps > 0:  # a case the plain prompt or a replay broke never took a place
                self.waiting.append(_Reused(steps))

    def _fill(self) -> None:
        """Give each free place, lowest first, the next case in the order of the cases, reading
        jobs only as far as a free place needs; a reused case holds its place for its steps. Then
        set the rows of the calls: every place while each is taken; once the jobs ran out, the
        places still taken."""
        added = 0
        if self.batch_size is None and not self._read_job():  # the first job decides an "auto" size
            return
        busy = {slot.place for slot in self.slots} | set(self.held)
        for place in range(self.batch_size):
            if place in busy:
                continue
            while not self.waiting and self.jobs_left:
                self._read_job()  # when the jobs run out, the reused cases after the last are queued
            if not self.waiting:
                break
            item = self.waiting.popleft()
            if isinstance(item, _Reused):
                self.held[place] = self.clock + item.steps
            else:
                slot = self._new_slot(item)
                slot.place = place
                self.slots.append(slot)
                added += 1
        rows = sorted({slot.place for slot in self.slots} | set(self.held))
        changed = rows != self.row_places
        self.row_places, self.row_of = rows, {place: row for row, place in enumerate(rows)}
        if added:
            self._joined(added)
        elif changed and self.slots:
            self._rows_changed()

    def _expire(self) -> bool:
        """End the stays of reused cases that end at the current step; True if any did."""
        ended = [place for place, end in self.held.items() if end <= self.clock]
        for place in ended:
            del self.held[place]
        return bool(ended)

    def _remove(self, finished: list[int]) -> None:
        keep = [i for i in range(len(self.slots)) if i not in set(finished)]
        self.slots = [self.slots[i] for i in keep]
        self._left(keep)

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> Iterator[tuple[AttackJob, AttackOutcome]]:
        with contextlib.ExitStack() as stack:
            self._fill()
            entered = False
            while self.slots or self.held:
                if not self.slots:  # only reused cases hold places: no model work until the next stay ends
                    self.clock = min(self.held.values())
                    self._expire()
                    self._fill()
                    continue
                if not entered:
                    self._enter(stack)
                    entered = True
                started = time.perf_counter()
                self._step()
                self.clock += 1
                elapsed = time.perf_counter() - started
                for slot in self.slots:
                    slot.outcome.optimize_seconds += elapsed / len(self.slots)
                    slot.step_in_block += 1
                    slot.outcome.steps += 1
                if self.on_step is not None:
                    self.on_step([(s.job.case, s.outcome.steps, self.max_steps) for s in self.slots])
                ended = [i for i, slot in enumerate(self.slots) if self._block_ended(slot)]
                finished = self._end_blocks(ended) if ended else []
                for i in finished:
                    yield self.slots[i].job, self.slots[i].outcome
                if finished:
                    self._remove(finished)
                elif ended:
                    self._next_blocks()
                if self._expire() or finished:
                    self._fill()

    # --- what an attack gives -----------------------------------------------------------------

    def _setup(self, context: AttackContext) -> None:
        raise NotImplementedError

    def _new_slot(self, job: AttackJob) -> Any:
        raise NotImplementedError

    def _step(self) -> None:
        raise NotImplementedError

    def _block_ended(self, slot: Any) -> bool:
        raise NotImplementedError

    def _end_blocks(self, ended: list[int]) -> list[int]:
        raise NotImplementedError

    def _joined(self, added: int) -> None:
        """The last ``added`` slots (of ``self.slots``) just joined."""

    def _left(self, keep: list[int]) -> None:
        """Only the slots that were at indices ``keep`` remain."""

    def _rows_changed(self) -> None:
        """``self.row_places`` changed while the same cases stay (a reused case's stay ended)."""

    def _next_blocks(self) -> None:
        """Some cases ended a block and went on to their next one; none finished."""

    def _enter(self, stack: contextlib.ExitStack) -> None:
        """Enter the contexts the batch needs while it runs (left when the loop ends or is closed)."""
