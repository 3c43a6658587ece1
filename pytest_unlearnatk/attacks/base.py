"""What an attack gets to work with and what it hands back. Attacks know nothing of pytest."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Protocol

from ..cases import Case
from ..errors import UnlearnAtkError
from ..judges import Judge, Verdict, to_verdict
from ..models import LoadedModel
from ..render import Renderer
from ..results import CandidateCheck
from ..targets import TargetSource
from ..tokens import FittedPrompt, TokenLayout


class Checker:
    """Renders an id sequence with the unlearned model and judges it; counts renders and time.

    Images are judged one at a time. They are rendered alone or in batches of a fixed number of
    rows, never in a batch whose shape depends on how many candidates happen to be waiting:
    kernels round differently at other shapes, and a judge's line can fall inside that rounding,
    so a case's verdict would depend on which cases shared its batch (and so on where an
    interrupted run was resumed). At a given shape a row's image does not depend on what the other
    rows hold, but it can depend on the row (CPU kernels round their last rows differently): a
    batched attack renders each case's checks in the row of its batch place (``places``), in a
    render of as many rows as its model calls have, which follow the gate's timeline (see
    :mod:`.batching`), and tests/test_attack.py checks it bit for bit. docs/performance.md has the
    costs.
    """

    def __init__(self, renderer: Renderer, judge: Judge, case: Case) -> None:
        self.renderer, self.judge, self.case = renderer, judge, case
        self.renders = 0
        self.render_seconds = 0.0
        self.judge_seconds = 0.0

    def __call__(self, ids: list[int]) -> tuple[Verdict, Any]:
        [image] = self.render_block([ids], 1)
        return self.judge_image(image), image

    def render_block(self, id_sequences: list[list[int]], rows: int) -> list[Any]:
        """Images of up to ``rows`` candidates of this case, rendered as one batch of exactly
        ``rows`` (padded with copies of the last candidate, whose images are dropped), so that a
        candidate's image depends on ``rows``, never on its neighbours."""
        if not 1 <= len(id_sequences) <= rows:
            raise ValueError(f"{len(id_sequences)} candidates for a block of {rows}")
        return render_in_blocks([(self, ids) for ids in id_sequences], rows)

    def judge_image(self, image: Any) -> Verdict:
        """The judge's verdict on one image of this case, judged alone."""
        start = time.perf_counter()
        verdict = judge_one(self.judge, image)
        self.judge_seconds += time.perf_counter() - start
        return verdict

    @staticmethod
    def check_many(requests: list[tuple[Checker, list[int]]], rows: int = 1,
                   around: BlockContext | None = None, places: list[int] | None = None) -> list[tuple[Verdict, Any]]:
        """Render several cases' candidates in batches of exactly ``rows`` (see
        :func:`render_in_blocks`, and its ``around`` and ``places``) and judge each image alone;
        ``rows=1`` renders each alone."""
        images = render_in_blocks(requests, rows, around, places)
        return [(checker.judge_image(image), image) for (checker, _), image in zip(requests, images)]


# given the indices (into the requests) of a render's rows, padded rows included, in order: a
# context held around that one render (concept inversion injects each row's embedding)
BlockContext = Callable[[list[int]], contextlib.AbstractContextManager[Any]]


def render_in_blocks(requests: list[tuple[Checker, list[int]]], rows: int,
                     around: BlockContext | None = None, places: list[int] | None = None) -> list[Any]:
    """One image per (checker, ids) request, each at its case's seed and guidance, rendered in
    batches of exactly ``rows`` images: requests that share a renderer and a guidance value are
    rendered together. Without ``places``, ``rows`` at a time in order, the last batch padded with
    copies of its last request; with ``places`` (one row index per request, distinct among the
    requests that share a renderer and a guidance), each request in its own row of one batch, the
    other rows copies of the first request. Padded rows' images are dropped. Each checker is charged
    its share of the batch's time. ``around(indices)``: a context entered around each batch's one
    ``render_many`` call, given the requests of its rows in order, padded rows included (its text
    encoder reads them in that order)."""
    if rows < 1:
        raise ValueError(f"blocks of {rows} rows")
    groups: dict[tuple[int, float], list[int]] = {}
    for index, (checker, _) in enumerate(requests):
        groups.setdefault((id(checker.renderer), float(checker.case.guidance)), []).append(index)
    images: list[Any] = [None] * len(requests)
    for indices in groups.values():
        for padded, row_of in _layouts(indices, rows, places):
            cases = [requests[i][0].case for i in padded]
            start = time.perf_counter()
            with around(padded) if around is not None else contextlib.nullcontext():
                rendered = requests[padded[0]][0].renderer.render_many(
                    [requests[i][1] for i in padded], [case.seed for case in cases], [case.guidance for case in cases])
            share = (time.perf_counter() - start) / len(row_of)
            for i, row in row_of.items():
                checker = requests[i][0]
                images[i] = rendered[row]
                checker.renders += 1
                checker.render_seconds += share
    return images


def _layouts(indices: list[int], rows: int, places: list[int] | None) -> list[tuple[list[int], dict[int, int]]]:
    """The renders of one group of requests: (the request in each row, padding included; the row
    of each request it renders)."""
    if places is None:
        chunks = [indices[first:first + rows] for first in range(0, len(indices), rows)]
        return [(chunk + [chunk[-1]] * (rows - len(chunk)), {i: row for row, i in enumerate(chunk)}) for chunk in chunks]
    row_of = {i: places[i] for i in indices}
    if len(set(row_of.values())) < len(indices) or not all(0 <= row < rows for row in row_of.values()):
        raise ValueError(f"places {list(row_of.values())} for a render of {rows} rows")
    by_row = {row: i for i, row in row_of.items()}
    return [([by_row.get(row, indices[0]) for row in range(rows)], row_of)]


def judge_one(judge: Judge, image: Any) -> Verdict:
    """The judge's checked verdict on one image (one verdict back, a real bool, a finite score)."""
    raw = judge([image])
    if not isinstance(raw, (list, tuple)) or len(raw) != 1:
        shown = f"{len(raw)} verdicts" if isinstance(raw, (list, tuple)) else repr(raw)[:80]
        raise UnlearnAtkError(f"judge {judge.name} returned {shown} for 1 image; it must return a list with one verdict per image")
    return to_verdict(raw[0], judge.name)


@dataclass
class AttackContext:
    """Everything an attack may use for one case whose plain prompt was not a hit."""

    model: LoadedModel
    layout: TokenLayout
    check: Checker
    target: TargetSource | None  # None when the gate was set up without a base model or target dir
    concept: str = ""  # the gate's concept (Ring-A-Bell derives its concept direction from it)
    base: Any = None  # the base model (LoadedModel or LazyModel) when the gate has one; P4D runs it


@dataclass
class AttackOutcome:
    hit: bool = False
    adversarial_ids: list[int] = field(default_factory=list)
    verdict: Verdict | None = None
    image: Any = None  # the image of the last checked candidate (the hit, if any)
    hit_step: int | None = None
    hit_timestep: int | None = None
    steps: int = 0
    loss_trace: list[float] = field(default_factory=list)
    checks: list[CandidateCheck] = field(default_factory=list)
    optimize_seconds: float = 0.0
    # the candidate's whole content (no BOS/EOS/padding) when it is not ``adversarial_ids`` followed
    # by the prompt: the free tokens alone (P4D-n, Ring-A-Bell) or tokens between the prompt's (P4D-k)
    content_ids: list[int] | None = None
    # a continuous embedding (concept inversion): a (positions, width) float tensor injected at
    # ``embedding_positions`` of the id sequence; the ids there are placeholders
    embedding: Any = None
    embedding_positions: list[int] = field(default_factory=list)


@dataclass
class AttackJob:
    """One case handed to an attack that works on several cases at once.

    ``index``: the case's index in the caller's list of cases (jobs come in that order).
    ``None``: the order in which the jobs arrive.

    ``reused_steps``: the caller's cases whose results it took from the store instead of
    attacking them (index -> the steps the attack took on each), one mapping shared by all jobs
    and filled as the caller goes: it holds every such case before ``index`` when the job comes,
    and all of them once the jobs run out. A batched attack gives them their places in turn and
    keeps those taken for their steps, as the run that computed them did, so that a resumed run
    gives every other case the place and the shapes of calls, and so the numbers, of an
    uninterrupted one (:mod:`.batching`)."""

    case: Case
    prompt: FittedPrompt
    context: AttackContext
    index: int | None = None
    reused_steps: Mapping[int, int] = field(default_factory=dict)


class Attack(Protocol):
    """What the gate asks of every attack: one way, for one case or many.

    An attack class (what the ``pytest_unlearnatk.attacks`` entry point names) also carries, as
    class attributes: ``name``; ``config_class`` (a frozen dataclass: its fields are the settings
    the attack accepts); ``presets`` (budget name -> config; empty when the attack has no budget);
    ``default_preset``; ``requires`` (the heavy modules it imports when run). It is built from a
    config: ``AttackClass(config)``; :func:`configure_attack` does that from a budget and settings.
    """

    name: str
    n_adversarial: int  # how many token slots the prompt must leave free
    needs_target: bool  # does it need target images (a base model or a target directory)?

    def config_dict(self) -> dict[str, Any]:
        """Everything that decides its results (part of the store key)."""
        ...

    def run_many(self, jobs: Iterable[AttackJob], batch_size: int | None = None, on_step: StepCallback | None = None,
                 compile_unet: bool = False, case_count: int | None = None) -> Iterator[tuple[AttackJob, AttackOutcome]]:
        """Attack the jobs' cases (``batch_size`` at once where it can; None: its own choice) and
        yield each with its outcome as soon as it is done (not necessarily in order).
        ``case_count``: how many cases the gate has (the jobs are read lazily; some never come)."""
        ...


class CaseByCase:
    """Base for attacks that work on one case at a time: they write ``run(case, prompt, context)``;
    ``run_many`` loops. A ``run`` that also takes ``on_step`` is handed the progress callback."""

    def run(self, case: Case, prompt: FittedPrompt, context: AttackContext) -> AttackOutcome:
        raise NotImplementedError

    def run_many(self, jobs: Iterable[AttackJob], batch_size: int | None = None, on_step: StepCallback | None = None,
                 compile_unet: bool = False, case_count: int | None = None) -> Iterator[tuple[AttackJob, AttackOutcome]]:
        import inspect

        progress = {"on_step": on_step} if "on_step" in inspect.signature(self.run).parameters else {}
        for job in jobs:
            yield job, self.run(job.case, job.prompt, job.context, **progress)


ATTACK_CLASS_ATTRIBUTES = ("name", "config_class", "presets", "default_preset", "run_many", "config_dict")


def check_attack_class(attack_class: Any) -> type:
    """``attack_class`` if it is an attack class (see :class:`Attack`); else an error naming what it is
    and what is missing (a ``module:Class`` reference to something else fails here, not deep inside)."""
    missing = [name for name in ATTACK_CLASS_ATTRIBUTES if not hasattr(attack_class, name)]
    config_class = getattr(attack_class, "config_class", None)
    if not isinstance(attack_class, type) or missing or not is_dataclass(config_class):
        what = (getattr(attack_class, "__qualname__", None) or type(attack_class).__name__)
        lacking = f"it lacks {', '.join(missing)}" if missing else "its config_class is not a dataclass"
        if not isinstance(attack_class, type):
            lacking = f"it is a {type(attack_class).__name__}, not a class"
        raise UnlearnAtkError(f"{what} is not an attack: {lacking}; an attack is a class with "
                              f"{', '.join(ATTACK_CLASS_ATTRIBUTES)} (see the Attack protocol in pytest_unlearnatk/attacks/base.py)")
    return attack_class


def accepted_settings(attack_class: type) -> list[str]:
    """The settings an attack class accepts: the fields of its config class."""
    return [f.name for f in fields(check_attack_class(attack_class).config_class)]


class SettingError(UnlearnAtkError):
    """An attack setting or budget is wrong: ``key`` names it, ``detail`` says what would be right."""

    def __init__(self, attack: str, key: str, detail: str) -> None:
        super().__init__(f"attack {attack!r}: {key} {detail}")
        self.key, self.detail = key, detail


def configure_attack(attack_class: type, budget: str | Any | None = None, **settings: Any) -> Any:
    """An attack built from a budget (a preset name, a config of its class, or None for its
    default) with single settings changed; a wrong budget or setting raises :class:`SettingError`
    naming what the attack accepts."""
    known = accepted_settings(attack_class)  # checks that it is an attack class
    name, presets = attack_class.name, attack_class.presets
    for key in settings:
        if key not in known:
            raise SettingError(name, key, f"is not a setting of this attack; its settings: {', '.join(known) or 'none'}")
    if isinstance(budget, attack_class.config_class):
        config = budget
    elif budget is not None and not isinstance(budget, str):
        raise SettingError(name, "budget", f"is {budget!r}: give a preset name or a {attack_class.config_class.__name__}")
    elif presets:
        preset = budget or attack_class.default_preset
        if preset not in presets:
            raise SettingError(name, "budget", f"is {preset!r}; use one of {', '.join(presets)}")
        config = presets[preset]
    elif budget is not None:
        raise SettingError(name, "budget", f"is {budget!r}, but this attack has no budget presets; drop it")
    else:
        config = attack_class.config_class()
    return attack_class(replace(config, **settings))


# called after each optimization step with (case, steps done, most steps) of every case in the batch
StepCallback = Callable[[list[tuple[Case, int, int]]], None]
