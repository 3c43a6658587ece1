"""Run one gate from Python: cases -> store lookup -> plain prompt -> replay -> attack -> results.

    from pytest_unlearnatk import load_pipeline, load_cases, run_gate
    model = load_pipeline("path/to/unlearned")
    result = run_gate(model, load_cases("nudity.csv"), judge="nudenet", base=load_pipeline("path/to/base"))
    print(result.summary())

For each case: a result stored under the same key is reused (no model work); otherwise the plain
prompt is judged, then every stored adversarial prompt of the concept found for this case is
replayed, and only then does the attack optimize (several cases at once, see ``batch_size``).
Each finished case is written to the store at once, so an interrupted run loses at most the
cases it was working on.

``run_gate`` checks its keywords into a :class:`GateSettings` once; :func:`execute` runs a gate
from those settings (the pytest plugin builds them from a gate declaration and the run's options).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .attacks import Attack, AttackContext, AttackJob, AttackOutcome, Checker, get_attack
from .cases import Case, load_cases
from .concepts import concept_defaults
from .errors import SettingProblem, UnlearnAtkError
from .images import ImageKeeper
from .judges import Judge, get_judge
from .models import LazyModel, LoadedModel
from .options import parse_batch, parse_shard
from .progress import GateProgress, ProgressTracker, TqdmSink
from .render import NonFiniteError, Renderer, RenderSettings
from .results import CaseResult, GateResult
from .store import Store, StoredPrompt, StoreWarning, case_key, digest
from .targets import DirectoryTargets, RenderedTargets, TargetSource
from .tokens import LONG_PROMPT_POLICIES, TokenLayout, fit_prompt

Model = LoadedModel | LazyModel


@dataclass(frozen=True)
class GateSettings:
    """What decides how a gate runs, resolved and checked: the attack and judge objects, render
    settings, long-prompt policy, concept (the store's name for it), and how the work is done."""

    attack: Attack
    judge: Judge
    render: RenderSettings = field(default_factory=RenderSettings)
    long_prompts: str = "truncate"
    concept: str = ""  # "" until built: then the judge's name unless given
    replay_only: bool = False
    shard: tuple[int, int] | None = None
    batch_size: int | None = None  # None: automatic
    compile_unet: bool = False
    target_dir: Path | None = None
    stop_settled_at: float | None = None  # a max_asr: stop once the verdict against it cannot change

    @classmethod
    def build(
        cls, *, judge: str | Judge | Callable[..., Any], attack: str | Attack = "unlearndiffatk", budget: Any = None,
        attack_settings: dict[str, Any] | None = None, render: RenderSettings | None = None,
        long_prompts: str = "truncate", concept: str | None = None, replay_only: bool = False,
        shard: Any = None, batch_size: Any = None, compile_unet: bool = False, target_dir: str | Path | None = None,
        stop_settled_at: float | None = None,
    ) -> GateSettings:
        """Check every value once; a wrong one raises :class:`UnlearnAtkError` naming it."""
        if long_prompts not in LONG_PROMPT_POLICIES:
            raise UnlearnAtkError(f"long_prompts={long_prompts!r}; use one of {', '.join(LONG_PROMPT_POLICIES)}")
        checked = {}
        for keyword, value, parse in (("shard", shard, parse_shard), ("batch_size", batch_size, parse_batch)):
            try:
                checked[keyword] = parse(value)
            except ValueError as error:
                raise UnlearnAtkError(f"{keyword}={value!r}: {error}") from None
        shard, batch_size = checked["shard"], checked["batch_size"]
        if stop_settled_at is not None:
            from .checks import finite

            stop_settled_at = finite(stop_settled_at, "stop_settled_at (a max_asr)", 0.0, 1.0)
        if concept is not None and not isinstance(concept, str):
            raise UnlearnAtkError(f"concept={concept!r}: give the concept's name as text (e.g. 'nudity'), or None")
        if isinstance(render, Mapping):  # as a YAML gate writes it: {steps: 25}
            try:
                render = RenderSettings(**render)
            except TypeError as error:
                raise UnlearnAtkError(f"render={dict(render)!r}: {error}; the keys are those of RenderSettings") from None
        elif render is not None and not isinstance(render, RenderSettings):
            raise UnlearnAtkError(f"render={render!r}: give a RenderSettings (or a mapping of its fields), or None")
        if attack is None:
            raise UnlearnAtkError("attack=None: give an attack name (e.g. 'unlearndiffatk', 'no_attack') or an attack object")
        judge = get_judge(judge)
        return cls(
            attack=get_attack(attack, budget, **(attack_settings or {})), judge=judge, render=render or RenderSettings(),
            long_prompts=long_prompts, concept=concept or judge.name, replay_only=replay_only, shard=shard,
            batch_size=batch_size, compile_unet=compile_unet, target_dir=Path(target_dir) if target_dir else None,
            stop_settled_at=stop_settled_at,
        )

    @property
    def attack_name(self) -> str:
        return "replay_only" if self.replay_only else self.attack.name


@dataclass
class _GateJob(AttackJob):
    """A case handed to the attack, with what the gate needs to finish its result."""

    index: int = 0
    key: str = ""
    material: dict[str, Any] | None = None
    result: CaseResult | None = None
    started: float = 0.0


@dataclass
class _PlainCheck:
    """A case ready for its plain prompt's check: what its result needs afterwards."""

    key: str
    material: dict[str, Any]
    fitted: Any  # the FittedPrompt
    result: CaseResult
    check: Checker
    plain_ids: list[int]
    started: float


def run_gate(
    model: Model,
    cases: Iterable[Case] | str | Path,
    judge: str | Judge | Callable[..., Any],
    *,
    attack: str | Attack = "unlearndiffatk",
    budget: str | Any | None = None,
    base: Model | None = None,
    target_dir: str | Path | None = None,
    render: RenderSettings | None = None,
    long_prompts: str = "truncate",
    image_dir: str | Path | None = None,
    show_unsafe: bool = False,
    progress: bool | Callable[[GateProgress], None] | None = None,
    on_case: Callable[[CaseResult], None] | None = None,
    concept: str | None = None,
    store: Store | None = None,
    replay_only: bool = False,
    shard: tuple[int, int] | None = None,
    batch_size: int | str | None = "auto",
    compile_unet: bool = False,
    stop_settled_at: float | None = None,
    **attack_settings: Any,
) -> GateResult:
    """Attack every case and return the gate's numbers.

    ``judge``: a registered judge name or a callable. ``attack``: a registered attack name or
    ``module:Class`` (default ``unlearndiffatk``). ``budget``: a preset name of that attack
    (``smoke``, ``fast``, ``reference``) or a config of its class (default: the attack's own
    default, ``reference``); ``attack_settings`` override single settings (``n_tokens=3``).
    Targets come from ``target_dir`` if given, else are rendered by ``base`` (default: the base a
    weights-file model was loaded over, if any).
    ``long_prompts``: ``truncate`` (default), ``skip`` or ``error``. ``image_dir``: where the target,
    plain and adversarial images of every case are written (small PNGs named by their SHA-256;
    ``CaseResult.images`` maps each kind to its file name); a ``store`` keeps them too. Images of
    an unsafe concept (nudity) are blurred unless ``show_unsafe``. ``progress``: ``True`` for a tqdm bar
    (default: when stderr is a terminal), ``False`` for none, or a callable that gets a
    :class:`~pytest_unlearnatk.progress.GateProgress` after every case and optimization step.
    ``on_case`` is called with each case's result as soon as it is final (with batching, not
    necessarily in case order; the returned result lists cases in order).
    ``batch_size``: how many cases the attack optimizes at once, and how many plain prompts are
    rendered together (``"auto"``: by free memory and the model's size, see docs/performance.md);
    each case's tokens and verdict are the same at any batch size (up to float rounding). ``compile_unet``: run the attack's UNet calls through
    ``torch.compile``.

    ``store``: reuse and record results and adversarial prompts (under ``concept``, default the
    judge's name). ``replay_only``: judge the plain prompt and replay stored prompts, never
    optimize (the ASR is then a lower bound). ``shard=(i, n)``: compute only the i-th of n slices
    of the cases; the others are reused from the store or reported as pending.
    ``stop_settled_at=max_asr``: stop as soon as the verdict against ``max_asr`` can no longer
    change (cases not run get ``status="stopped"``; ``GateResult.asr_range`` bounds the ASR).
    """
    settings = GateSettings.build(
        judge=judge, attack=attack, budget=budget, attack_settings=attack_settings, render=render,
        long_prompts=long_prompts, concept=concept, replay_only=replay_only, shard=shard, batch_size=batch_size,
        compile_unet=compile_unet, target_dir=target_dir, stop_settled_at=stop_settled_at,
    )
    return execute(model, cases, settings, base=base, store=store, image_dir=image_dir, show_unsafe=show_unsafe,
                   progress=progress, on_case=on_case)


def settled(finished: Iterable[CaseResult], total: int, max_asr: float | None) -> bool:
    """Can the verdict against ``max_asr`` no longer change, whatever the unfinished cases give?

    FAIL is settled when the hits already exceed ``max_asr`` even if every other case is counted
    and resists; PASS when even all of them breaking keeps the ASR at or under it (and at least
    one case counted). Skipped cases only shrink n, which cannot turn a settled FAIL into a PASS.
    """
    if max_asr is None:
        return False
    results = list(finished)
    counted = [r for r in results if r.status == "done"]
    hits = sum(r.hit for r in counted)
    unknown = total - len(counted) - sum(r.status == "skipped" for r in results)
    if unknown == 0:
        return False  # nothing left to save: the gate is complete
    fails_anyway = hits / (len(counted) + unknown) > max_asr
    passes_anyway = bool(counted) and (hits + unknown) / (len(counted) + unknown) <= max_asr
    return fails_anyway or passes_anyway


def _check_run_objects(model: Any, base: Any, store: Any, progress: Any, on_case: Any, image_dir: Any) -> None:
    """The objects ``run_gate`` is given, checked before any model work (each named with its fix)."""
    for keyword, value in (("model", model), ("base", base)):
        if (value is not None or keyword == "model") and not isinstance(value, (LoadedModel, LazyModel)):
            hint = f": load it first, {keyword}=load_pipeline({value!r})" if isinstance(value, (str, Path)) else ""
            raise UnlearnAtkError(f"{keyword}={value!r:.80} is not a loaded model{hint} (a LoadedModel or LazyModel)")
    if store is not None and not isinstance(store, Store):
        hint = f": open it first, store=Store({store!r})" if isinstance(store, (str, Path)) else ""
        raise UnlearnAtkError(f"store={store!r:.80} is not a Store{hint}")
    if not (progress is None or isinstance(progress, bool) or callable(progress)):
        raise UnlearnAtkError(f"progress={progress!r}: give True (a progress bar), False, or a callable that takes a GateProgress")
    if on_case is not None and not callable(on_case):
        raise UnlearnAtkError(f"on_case={on_case!r}: give a callable that takes each CaseResult, or None")
    if image_dir is not None and not isinstance(image_dir, (str, Path)):
        raise UnlearnAtkError(f"image_dir={image_dir!r}: give a directory path, or None")


def execute(
    model: Model,
    cases: Iterable[Case] | str | Path,
    settings: GateSettings,
    *,
    base: Model | None = None,
    store: Store | None = None,
    image_dir: str | Path | None = None,
    show_unsafe: bool = False,
    progress: bool | Callable[[GateProgress], None] | None = None,
    on_case: Callable[[CaseResult], None] | None = None,
) -> GateResult:
    """Run a gate from checked settings (see :func:`run_gate` for the arguments)."""
    _check_run_objects(model, base, store, progress, on_case, image_dir)
    if base is None and settings.target_dir is None and model.base is not None:
        # a weights file (or a registered unlearned model) names the model it came from: it renders the targets
        base = LazyModel(model.base, device=model.device, dtype=model.dtype)
    case_list = load_cases(cases)  # a file, a registered set, or prompts / Case objects: all checked
    if progress is None:
        progress = sys.stderr.isatty()
    sink = TqdmSink(len(case_list), f"{settings.attack_name} {model.name}") if progress is True else progress or None
    tracker = ProgressTracker(len(case_list), sink)
    blur = bool(settings.concept) and concept_defaults(settings.concept).unsafe and not show_unsafe
    run = _GateRun(model=model, settings=settings, base=base, store=store,
                   images=ImageKeeper(image_dir, store, blur) if image_dir or store else None, tracker=tracker)
    results: dict[int, CaseResult] = {}
    reused = 0
    reused_steps: dict[int, int] = {}  # cases the attack ran on in an earlier run: see AttackJob.reused_steps

    def finish(index: int, result: CaseResult, was_reused: bool) -> None:
        nonlocal reused
        results[index] = result
        reused += was_reused
        if was_reused:
            reused_steps[index] = result.steps
        tracker.case_done(result.hit, was_reused, result.case.case_id)
        if on_case is not None:
            on_case(result)

    def jobs() -> Iterator[_GateJob]:
        """The cases that need the attack; every other case is finished on the way."""
        for index in range(len(case_list)):
            if settled(results.values(), len(case_list), settings.stop_settled_at):
                return
            job = run.begin(index, case_list)
            if isinstance(job, _GateJob):
                job.reused_steps = reused_steps
                yield job
            else:
                finish(index, *job)

    outcomes = settings.attack.run_many(jobs(), settings.batch_size, on_step=tracker.step,
                                        compile_unet=settings.compile_unet, case_count=len(case_list))
    try:
        for job, outcome in outcomes:
            if settled(results.values(), len(case_list), settings.stop_settled_at):
                break  # settled while the jobs were read: the cases in flight are dropped, as below
            finish(job.index, run.complete(job, outcome), False)
            if settled(results.values(), len(case_list), settings.stop_settled_at):
                break
    except NonFiniteError as error:
        if error.model is not None:
            raise
        raise NonFiniteError(f"model {model.source}: {error}", model=model.source) from None
    finally:
        outcomes.close()  # a settled gate drops the cases in flight (nothing of theirs is stored)
    for index, case in enumerate(case_list):
        results.setdefault(index, CaseResult(case=case, attack=settings.attack_name, status="stopped"))
    return GateResult(
        attack=settings.attack_name,
        judge=settings.judge.name,
        model=model.source,
        model_fingerprint=model.fingerprint,
        model_description=model.description or model.source,
        config=run.identity_config(),
        cases=[results[i] for i in range(len(case_list))],
        reused=reused,
        replay_only=settings.replay_only,
        white_box_bound=bool(getattr(settings.attack, "white_box_bound", False)) and not settings.replay_only,
    )


class _GateRun:
    """One gate's run: its settings and the model-side objects, built only when a case needs model work."""

    def __init__(self, *, model: Model, settings: GateSettings, base: Model | None, store: Store | None,
                 images: ImageKeeper | None, tracker: ProgressTracker) -> None:
        self.model, self.settings, self.base, self.store, self.images = model, settings, base, store, images
        self.target_images: dict[str, Any] = {}  # case id -> the target the attack asked for (shown in reports)
        self.tracker = tracker  # told what one-off work goes on (loading, targets), left out of the ETA
        self._prepared: dict[int, tuple[CaseResult, bool] | _PlainCheck] = {}  # cases prepared ahead, by index
        self._plain_verdicts: dict[int, tuple[Any, Any]] = {}  # index -> (verdict, image) of a plain prompt judged ahead
        self._plain_rows: int | None = None
        self.attack, self.judge = settings.attack, settings.judge
        model.fingerprint  # noqa: B018 (a model that cannot be found says so first, before anything it lacks)
        if not settings.replay_only and self.attack.needs_target and settings.target_dir is None and base is None:
            raise SettingProblem("base", f"attack {self.attack.name} needs target images", "BASE (the original model)",
                                 alternative="or target_dir=, a directory of images named by case number")
        if not settings.replay_only and getattr(self.attack, "needs_base", False) and base is None:
            raise SettingProblem("base", f"attack {self.attack.name} runs the base model in its loop",
                                 "BASE (the original model)")

    # --- identity: what decides a case's result -------------------------------------------

    def identity_config(self) -> dict[str, Any]:
        settings = self.settings
        identity = {
            "attack": settings.attack_name,
            "attack_config": {} if settings.replay_only else self.attack.config_dict(),
            "judge": {"name": self.judge.name, **self.judge.settings},
            "render": settings.render.to_dict(),
            "long_prompts": settings.long_prompts,
            "targets": self._targets_identity(),
            "concept": settings.concept,
        }
        if not settings.replay_only and self.base is not None and (
                getattr(self.attack, "needs_base", False) or getattr(self.attack, "uses_base", False)):
            identity["base"] = self.base.fingerprint  # the attack runs the base model (P4D, Ring-A-Bell)
        return identity

    def _targets_identity(self) -> str | None:
        if self.settings.replay_only or not self.attack.needs_target:
            return None
        if self.settings.target_dir is not None:
            from .fingerprint import directory_fingerprint

            return f"dir:{directory_fingerprint(self.settings.target_dir)}"
        return f"base:{self.base.fingerprint}"

    @functools.cached_property
    def _identity(self) -> dict[str, Any]:
        return {"model": self.model.fingerprint, **self.identity_config()}

    # --- model-side objects, built on first use -------------------------------------------

    @functools.cached_property
    def loaded(self) -> LoadedModel:
        if isinstance(self.model, LoadedModel):
            return self.model
        if self.model.is_loaded:
            return self.model.load()
        started = time.perf_counter()
        self.tracker.set_phase(f"loading {self.model.source}")
        loaded = self.model.load()
        self.tracker.exclude(time.perf_counter() - started)
        self.tracker.set_phase(None)
        return loaded

    @functools.cached_property
    def layout(self) -> TokenLayout:
        return TokenLayout.from_pipeline(self.loaded.pipeline)

    @functools.cached_property
    def renderer(self) -> Renderer:
        return Renderer(self.loaded.pipeline, self.settings.render, label=f"model {self.model.source}")

    @functools.cached_property
    def targets(self) -> TargetSource | None:
        if self.settings.target_dir is not None:
            source = DirectoryTargets(self.settings.target_dir)
        elif self.base is not None:
            # the base is loaded only if a target is missing from the cache (at the model's image size)
            source = RenderedTargets(self.base, self.renderer.settings)
        else:
            return None

        def target(case: Case, prompt_ids: list[int]) -> Any:
            self.tracker.set_phase(f"target image of case {case.case_id}")
            try:
                image = self.target_images[case.case_id] = source(case, prompt_ids)
                return image
            finally:
                self.tracker.set_phase(None)

        return target

    @functools.cached_property
    def tokenizer_fingerprint(self) -> str:
        tokenizer = self.loaded.pipeline.tokenizer
        return digest([sorted(tokenizer.get_vocab().items()), self.layout.max_length])

    # --- one case -------------------------------------------------------------------------

    def begin(self, index: int, cases: list[Case]) -> tuple[CaseResult, bool] | _GateJob:
        """Everything before the attack for ``cases[index]``: the case's final result and whether
        it came from the store, or the job for the attack when neither the plain prompt nor a
        replay broke it. Plain prompts are rendered a block at a time (see :meth:`_plain_checks`)."""
        case = cases[index]
        prepared = self._prepared.pop(index, None) or self._prepare(case)
        if not isinstance(prepared, _PlainCheck):
            return prepared
        if index not in self._plain_verdicts:
            self._plain_checks(index, cases, prepared)
        verdict, plain_image = self._plain_verdicts.pop(index)
        result, check, settings = prepared.result, prepared.check, self.settings
        result.prompt_ids, result.verdict, result.plain_score = prepared.plain_ids, verdict.to_dict(), verdict.score
        self._save(plain_image, result, "plain")
        if verdict.hit:
            result.pre_attack_hit = result.hit = True
            result.hit_by = "plain"
        elif not self._replay(case, check, result) and not settings.replay_only:
            context = AttackContext(self.loaded, self.layout, check, self.targets, concept=settings.concept, base=self.base)
            return _GateJob(case, prepared.fitted, context, index=index, key=prepared.key, material=prepared.material,
                            result=result, started=prepared.started)
        return self._finish(prepared.key, prepared.material, result, check, prepared.started), False

    def _prepare(self, case: Case) -> tuple[CaseResult, bool] | _PlainCheck:
        """A case's stored result, its pending or skipped result, or what judging its plain prompt needs."""
        key, material = case_key(self._identity, case)
        settings, attack_name = self.settings, self.settings.attack_name
        if self.store is not None:
            stored = self.store.get_result(key)
            if stored is not None:
                try:
                    reused = CaseResult.from_dict(stored, case=case)
                except (KeyError, TypeError, ValueError) as error:  # an older, foreign or edited record
                    warnings.warn(f"store result {key[:12]}... of case {case.case_id}: not a valid result ({error}); "
                                  "the case is computed again", StoreWarning, stacklevel=3)
                else:
                    self._bring_images(reused)
                    return reused, True
        if settings.shard is not None and int(key, 16) % settings.shard[1] != settings.shard[0] - 1:
            return CaseResult(case=case, attack=attack_name, status="pending"), False
        started = time.perf_counter()
        tokenizer = self.loaded.pipeline.tokenizer
        n_adversarial = 0 if settings.replay_only else self.attack.n_adversarial
        fitted = fit_prompt(case, tokenizer, self.layout, n_adversarial, settings.long_prompts)
        result = CaseResult(case=case, attack=attack_name, truncated=fitted.truncated, n_prompt_tokens=fitted.n_prompt_tokens)
        if fitted.skip_reason:
            result.status, result.skip_reason = "skipped", fitted.skip_reason
            return self._record(key, material, result), False
        return _PlainCheck(key, material, fitted, result, Checker(self.renderer, self.judge, case),
                           self.layout.sequence(fitted.content_ids), started)

    def _plain_checks(self, index: int, cases: list[Case], first: _PlainCheck) -> None:
        """Judge the plain prompts of case ``index`` and of the cases after it up to the end of its
        block of ``plain_rows`` cases, rendered as one batch of exactly ``plain_rows`` rows, case
        ``j`` in row ``j % plain_rows`` (as the attack places its cases): a plain image depends on
        its case and the batch size, never on which cases share its render, so a resumed run
        judges each plain prompt as the whole run does. Cases ahead are prepared now and kept."""
        rows = self.plain_rows(len(cases))
        waiting = {index: first}
        for ahead in range(index + 1, index - index % rows + rows):
            if ahead < len(cases) and ahead not in self._prepared:
                self._prepared[ahead] = self._prepare(cases[ahead])
            if isinstance(self._prepared.get(ahead), _PlainCheck):
                waiting[ahead] = self._prepared[ahead]
        checked = Checker.check_many([(plain.check, plain.plain_ids) for plain in waiting.values()], rows=rows,
                                     places=[j % rows for j in waiting])
        self._plain_verdicts.update(zip(waiting, checked))

    def plain_rows(self, case_count: int) -> int:
        """How many plain prompts are rendered together: the gate's batch size (``auto``: what the
        attack would choose on this model), at most the number of cases."""
        from .attacks.batching import case_memory_bytes, resolve_batch_size

        if self._plain_rows is None:
            unet = self.loaded.pipeline.unet
            size = resolve_batch_size(self.settings.batch_size, str(self.loaded.pipeline.device),
                                      case_memory_bytes(unet.config, unet.dtype.itemsize))
            self._plain_rows = max(1, min(size, case_count))
        return self._plain_rows

    def complete(self, job: _GateJob, outcome: AttackOutcome) -> CaseResult:
        """The case's result once the attack is done with it (written to the store at once)."""
        self._apply(job.prompt, outcome, job.result)
        self._save(self.target_images.pop(job.case.case_id, None), job.result, "target")
        return self._finish(job.key, job.material, job.result, job.context.check, job.started)

    def _finish(self, key: str, material: dict[str, Any], result: CaseResult, check: Checker, started: float) -> CaseResult:
        result.renders = check.renders
        result.timings.update(render_s=check.render_seconds, judge_s=check.judge_seconds, total_s=time.perf_counter() - started)
        return self._record(key, material, result)

    def _record(self, key: str, material: dict[str, Any], result: CaseResult) -> CaseResult:
        if self.store is not None:
            self.store.put_result(key, material, result.to_dict())
        return result

    def _replay(self, case: Case, check: Checker, result: CaseResult) -> bool:
        """Try the stored adversarial prompts found for this case; True on a hit."""
        if self.store is None:
            return False
        tokenizer = self.loaded.pipeline.tokenizer
        capacity = self.layout.content_capacity(0)
        for stored in self.store.prompts_for(self.settings.concept, case.prompt, case.seed, case.guidance):
            same_tokenizer = stored.tokenizer == self.tokenizer_fingerprint
            content = stored.content_ids if same_tokenizer else tokenizer(stored.text, add_special_tokens=False).input_ids
            if any(i >= self.layout.vocab_size for i in content):
                warnings.warn(f"stored prompt {stored.key[:12]}... of case {case.case_id} holds token ids beyond this "
                              f"model's vocabulary ({self.layout.vocab_size}); skipped", StoreWarning, stacklevel=2)
                continue
            ids = self.layout.sequence(list(content)[:capacity])
            if stored.embedding:
                injected = self._stored_embedding(stored, case, same_tokenizer)
                if injected is None:
                    continue
                with injected:
                    verdict, image = check(ids)
            else:
                verdict, image = check(ids)
            if verdict.hit:
                result.hit, result.hit_by = True, "replay"
                result.prompt_ids, result.verdict = ids, verdict.to_dict()
                result.adversarial_ids = list(stored.adversarial_ids) if same_tokenizer else []
                result.adversarial_text = stored.text
                result.embedding = stored.embedding
                self._save(image, result, "adversarial")
                return True
        return False

    def _stored_embedding(self, stored: StoredPrompt, case: Case, same_tokenizer: bool) -> Any:
        """An injector holding a stored prompt's learned embedding, ready to render it; None (with
        a warning) when the file is missing or does not fit this model's text encoder."""
        from .attacks.concept_inversion import load_embedding
        from .attacks.unlearndiffatk import EmbeddingInjector

        data = self.store.embedding_bytes(stored.embedding)
        problem = "is not in the store (or damaged)" if data is None else ""
        if data is not None:
            embedding, positions = load_embedding(data)
            encoder = self.loaded.pipeline.text_encoder
            width = encoder.get_input_embeddings().weight.shape[1]
            if not same_tokenizer or embedding.shape != (len(positions), width):
                problem = f"does not fit this model's text encoder ({tuple(embedding.shape)} for width {width})"
        if problem:
            warnings.warn(f"stored prompt {stored.key[:12]}... of case {case.case_id}: its embedding {stored.embedding} "
                          f"{problem}; skipped", StoreWarning, stacklevel=3)
            return None
        injector = EmbeddingInjector(encoder, positions)

        @contextlib.contextmanager
        def injected() -> Iterator[None]:
            with injector.active():
                injector.embeddings = embedding.to(encoder.device)
                yield

        return injected()

    def _apply(self, fitted: Any, outcome: AttackOutcome, result: CaseResult) -> None:
        """The attack's outcome into the case's result; a prompt that broke the model into the store."""
        tokenizer = self.loaded.pipeline.tokenizer
        result.take_search(outcome)
        if outcome.adversarial_ids:
            # prefix attacks: the adversarial ids, then the prompt's; others say their whole content
            content = (list(outcome.content_ids) if outcome.content_ids is not None
                       else list(outcome.adversarial_ids) + list(fitted.content_ids))
            result.adversarial_ids = list(outcome.adversarial_ids)
            result.prompt_ids = self.layout.sequence(content)
            result.adversarial_text = tokenizer.decode(content)
            result.reencodes_identically = list(tokenizer(result.adversarial_text, add_special_tokens=False).input_ids) == content
            if outcome.embedding is not None:  # a learned embedding over placeholder ids: no text stands for it
                from .attacks.concept_inversion import INVERTED, embedding_bytes

                result.adversarial_text = f"{INVERTED} {tokenizer.decode(list(fitted.content_ids))}"
                result.reencodes_identically = False
                if self.store is not None:
                    result.embedding = self.store.put_embedding(
                        embedding_bytes(outcome.embedding, outcome.embedding_positions))
            result.verdict = outcome.verdict.to_dict() if outcome.verdict else result.verdict
            self._save(outcome.image, result, "adversarial")
        if outcome.hit:
            result.hit, result.hit_by = True, self.attack.name
            if self.store is not None:
                self.store.put_prompt(StoredPrompt.of_hit(
                    self.settings.concept, result, content, tokenizer=self.tokenizer_fingerprint,
                    render=self.renderer.settings, model=self.model, judge=self.judge.name, found_by=self.attack.name,
                ))

    def _save(self, image: Any, result: CaseResult, kind: str) -> None:
        if self.images is not None and image is not None:
            result.images[kind] = self.images.keep(image)

    def _bring_images(self, result: CaseResult) -> None:
        """A reused result's images into this run's image directory; one the store lacks is a warning."""
        if self.images is None:
            return
        missing = [kind for kind, name in result.images.items() if not self.images.bring(name)]
        if missing:
            warnings.warn(f"case {result.case.case_id}: images not in the store ({', '.join(missing)}; stored by an "
                          "earlier version, or removed); the report shows them as missing", StoreWarning, stacklevel=3)
