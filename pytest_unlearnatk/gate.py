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
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .attacks import Attack, AttackContext, AttackJob, AttackOutcome, Checker, UnlearnDiffAtkConfig, get_attack
from .cases import Case, load_cases
from .errors import UnlearnAtkError
from .judges import Judge, get_judge
from .models import LazyModel, LoadedModel
from .progress import GateProgress, ProgressTracker, TqdmSink
from .render import Renderer, RenderSettings
from .results import CaseResult, GateResult
from .store import FORMAT, Store, StoredPrompt, digest
from .targets import DirectoryTargets, RenderedTargets, TargetSource
from .tokens import TokenLayout, fit_prompt

Model = LoadedModel | LazyModel


@dataclass
class _GateJob(AttackJob):
    """A case handed to the attack, with what the gate needs to finish its result."""

    index: int = 0
    key: str = ""
    material: dict[str, Any] | None = None
    result: CaseResult | None = None
    started: float = 0.0


def run_gate(
    model: Model,
    cases: Iterable[Case] | str | Path,
    judge: str | Judge | Callable[..., Any],
    *,
    attack: str | Attack = "unlearndiffatk",
    budget: str | UnlearnDiffAtkConfig = "reference",
    base: Model | None = None,
    target_dir: str | Path | None = None,
    render: RenderSettings | None = None,
    long_prompts: str = "truncate",
    image_dir: str | Path | None = None,
    progress: bool | Callable[[GateProgress], None] | None = None,
    on_case: Callable[[CaseResult], None] | None = None,
    concept: str | None = None,
    store: Store | None = None,
    replay_only: bool = False,
    shard: tuple[int, int] | None = None,
    batch_size: int | str | None = "auto",
    compile_unet: bool = False,
    **attack_settings: Any,
) -> GateResult:
    """Attack every case and return the gate's numbers.

    ``judge``: a registered judge name or a callable. ``budget``: a preset name (``smoke``,
    ``fast``, ``reference``) or a config; ``attack_settings`` override single settings
    (``n_tokens=3``). Targets come from ``target_dir`` if given, else are rendered by ``base``
    (default: the base a weights-file model was loaded over, if any).
    ``long_prompts``: ``truncate`` (default), ``skip`` or ``error``. ``image_dir``: where the plain
    and adversarial images of every case are written. ``progress``: ``True`` for a tqdm bar
    (default: when stderr is a terminal), ``False`` for none, or a callable that gets a
    :class:`~pytest_unlearnatk.progress.GateProgress` after every case and optimization step.
    ``on_case`` is called with each case's result as soon as it is final (with batching, not
    necessarily in case order; the returned result lists cases in order).
    ``batch_size``: how many cases UnlearnDiffAtk optimizes at once (``"auto"``: by free memory and
    the model's size, at most 8 on the CPU and 16 on a GPU); each case's tokens and verdict are
    the same at any batch size (up to float rounding, see docs/performance.md).
    ``compile_unet``: run the attack's UNet calls through ``torch.compile``.

    ``store``: reuse and record results and adversarial prompts (under ``concept``, default the
    judge's name). ``replay_only``: judge the plain prompt and replay stored prompts, never
    optimize (the ASR is then a lower bound). ``shard=(i, n)``: compute only the i-th of n slices
    of the cases; the others are reused from the store or reported as pending.
    """
    if base is None and target_dir is None and model.base is not None:
        # a weights file (or toy:erased) names the model it was fine-tuned from: it renders the targets
        base = LazyModel(model.base, device=model.device, dtype=model.dtype)
    run = _GateRun(
        model=model, judge=get_judge(judge), attack=get_attack(attack, budget, **attack_settings), base=base,
        target_dir=target_dir, render=render or RenderSettings(), long_prompts=long_prompts,
        image_dir=Path(image_dir) if image_dir else None, concept=concept, store=store, replay_only=replay_only,
        shard=_check_shard(shard),
    )
    case_list = load_cases(cases) if isinstance(cases, (str, Path)) else list(cases)
    if progress is None:
        progress = sys.stderr.isatty()
    sink = TqdmSink(len(case_list), f"{run.attack_name} {model.name}") if progress is True else progress or None
    tracker = ProgressTracker(len(case_list), sink)
    results: dict[int, CaseResult] = {}
    reused = 0

    def finish(index: int, result: CaseResult, was_reused: bool) -> None:
        nonlocal reused
        results[index] = result
        reused += was_reused
        tracker.case_done(result.hit, was_reused)
        if on_case is not None:
            on_case(result)

    def jobs() -> Iterator[_GateJob]:
        """The cases that need the attack; every other case is finished on the way."""
        for index, case in enumerate(case_list):
            job = run.begin(index, case)
            if isinstance(job, _GateJob):
                yield job
            else:
                finish(index, *job)

    if hasattr(run.attack, "run_many"):
        for job, outcome in run.attack.run_many(jobs(), batch_size, on_step=tracker.step, compile_unet=compile_unet):
            finish(job.index, run.complete(job, outcome), False)
    else:
        for job in jobs():
            outcome = run.attack.run(job.case, job.prompt, job.context)
            finish(job.index, run.complete(job, outcome), False)
    return GateResult(
        attack=run.attack_name,
        judge=run.judge.name,
        model=model.source,
        model_fingerprint=model.fingerprint,
        config=run.identity_config(),
        cases=[results[i] for i in range(len(case_list))],
        reused=reused,
        replay_only=replay_only,
    )


def _check_shard(shard: tuple[int, int] | None) -> tuple[int, int] | None:
    if shard is not None:
        index, count = shard
        if not (isinstance(index, int) and isinstance(count, int) and 1 <= index <= count):
            raise UnlearnAtkError(f"shard {shard!r}: give (i, n) with 1 <= i <= n, e.g. (1, 4)")
    return shard


class _GateRun:
    """One gate's settings and the model-side objects, built only when a case needs model work."""

    def __init__(self, *, model: Model, judge: Judge, attack: Attack, base: Model | None, target_dir: str | Path | None,
                 render: RenderSettings, long_prompts: str, image_dir: Path | None, concept: str | None,
                 store: Store | None, replay_only: bool, shard: tuple[int, int] | None) -> None:
        self.model, self.judge, self.attack, self.base = model, judge, attack, base
        self.target_dir, self.render_settings, self.long_prompts = target_dir, render, long_prompts
        self.image_dir, self.store, self.replay_only, self.shard = image_dir, store, replay_only, shard
        self.concept = concept or judge.name
        self.attack_name = "replay_only" if replay_only else attack.name
        if not replay_only and attack.needs_target and target_dir is None and base is None:
            raise UnlearnAtkError(
                f"attack {attack.name} needs target images: pass base= (the original model; pytest: --unlearn-base) "
                "or target_dir= (images named by case number)"
            )

    # --- identity: what decides a case's result -------------------------------------------

    def identity_config(self) -> dict[str, Any]:
        return {
            "attack": self.attack_name,
            "attack_config": {} if self.replay_only else self.attack.config_dict(),
            "judge": {"name": self.judge.name, **self.judge.settings},
            "render": self.render_settings.to_dict(),
            "long_prompts": self.long_prompts,
            "targets": self._targets_identity(),
            "concept": self.concept,
        }

    def _targets_identity(self) -> str | None:
        if self.replay_only or not self.attack.needs_target:
            return None
        if self.target_dir is not None:
            from .fingerprint import directory_fingerprint

            return f"dir:{directory_fingerprint(self.target_dir)}"
        return f"base:{self.base.fingerprint}"

    @functools.cached_property
    def _identity(self) -> dict[str, Any]:
        return {"format": FORMAT, "model": self.model.fingerprint, **self.identity_config()}

    def key(self, case: Case) -> tuple[str, dict[str, Any]]:
        material = {**self._identity, "case": {"prompt": case.prompt, "seed": case.seed, "guidance": case.guidance}}
        return digest(material), material

    # --- model-side objects, built on first use -------------------------------------------

    @functools.cached_property
    def loaded(self) -> LoadedModel:
        return self.model.load() if isinstance(self.model, LazyModel) else self.model

    @functools.cached_property
    def layout(self) -> TokenLayout:
        return TokenLayout.from_pipeline(self.loaded.pipeline)

    @functools.cached_property
    def renderer(self) -> Renderer:
        return Renderer(self.loaded.pipeline, self.render_settings)

    @functools.cached_property
    def targets(self) -> TargetSource | None:
        if self.target_dir is not None:
            return DirectoryTargets(self.target_dir)
        if self.base is not None:
            # the base is loaded only if a target is missing from the cache (at the model's image size)
            return RenderedTargets(self.base, self.renderer.settings)
        return None

    @functools.cached_property
    def tokenizer_fingerprint(self) -> str:
        tokenizer = self.loaded.pipeline.tokenizer
        return digest([sorted(tokenizer.get_vocab().items()), self.layout.max_length])

    # --- one case -------------------------------------------------------------------------

    def begin(self, index: int, case: Case) -> tuple[CaseResult, bool] | _GateJob:
        """Everything before the attack: the case's final result and whether it came from the
        store, or the job for the attack when neither the plain prompt nor a replay broke it."""
        key, material = self.key(case)
        if self.store is not None:
            stored = self.store.get_result(key)
            if stored is not None:
                try:
                    return CaseResult.from_dict(stored, case=case), True
                except (KeyError, TypeError):
                    pass  # an older or foreign record: compute it again
        if self.shard is not None and int(key, 16) % self.shard[1] != self.shard[0] - 1:
            return CaseResult(case=case, attack=self.attack_name, status="pending"), False
        started = time.perf_counter()
        tokenizer = self.loaded.pipeline.tokenizer
        n_adversarial = 0 if self.replay_only else self.attack.n_adversarial
        fitted = fit_prompt(case, tokenizer, self.layout, n_adversarial, self.long_prompts)
        result = CaseResult(case=case, attack=self.attack_name, truncated=fitted.truncated, n_prompt_tokens=fitted.n_prompt_tokens)
        if fitted.skip_reason:
            result.status, result.skip_reason = "skipped", fitted.skip_reason
            return self._record(key, material, result), False
        check = Checker(self.renderer, self.judge, case)
        plain_ids = self.layout.sequence(fitted.content_ids)
        verdict, plain_image = check(plain_ids)
        result.prompt_ids, result.verdict = plain_ids, verdict.to_dict()
        self._save(plain_image, case, "plain", result)
        if verdict.hit:
            result.pre_attack_hit = result.hit = True
            result.hit_by = "plain"
        elif not self._replay(case, check, result) and not self.replay_only:
            context = AttackContext(self.loaded, self.layout, check, self.targets)
            return _GateJob(case, fitted, context, index=index, key=key, material=material, result=result, started=started)
        return self._finish(key, material, result, check, started), False

    def complete(self, job: _GateJob, outcome: AttackOutcome) -> CaseResult:
        """The case's result once the attack is done with it (written to the store at once)."""
        self._apply(job.case, job.prompt, outcome, job.result)
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
        for stored in self.store.prompts_for(self.concept, case.prompt, case.seed, case.guidance):
            same_tokenizer = stored.tokenizer == self.tokenizer_fingerprint
            content = stored.content_ids if same_tokenizer else tokenizer(stored.text, add_special_tokens=False).input_ids
            ids = self.layout.sequence(list(content)[:capacity])
            verdict, image = check(ids)
            if verdict.hit:
                result.hit, result.hit_by = True, "replay"
                result.prompt_ids, result.verdict = ids, verdict.to_dict()
                result.adversarial_ids = list(stored.adversarial_ids) if same_tokenizer else []
                result.adversarial_text = stored.text
                self._save(image, case, "adversarial", result)
                return True
        return False

    def _apply(self, case: Case, fitted: Any, outcome: AttackOutcome, result: CaseResult) -> None:
        """Copy the attack's outcome into the case's result; store a prompt that broke the model."""
        tokenizer = self.loaded.pipeline.tokenizer
        result.steps, result.loss_trace, result.checks = outcome.steps, outcome.loss_trace, outcome.checks
        result.timings["optimize_s"] = outcome.optimize_seconds
        if outcome.adversarial_ids:
            content = list(outcome.adversarial_ids) + list(fitted.content_ids)
            result.adversarial_ids = list(outcome.adversarial_ids)
            result.prompt_ids = self.layout.sequence(fitted.content_ids, outcome.adversarial_ids)
            result.adversarial_text = tokenizer.decode(content)
            result.reencodes_identically = list(tokenizer(result.adversarial_text, add_special_tokens=False).input_ids) == content
            result.verdict = outcome.verdict.to_dict() if outcome.verdict else result.verdict
            self._save(outcome.image, case, "adversarial", result)
        if outcome.hit:
            result.hit, result.hit_by = True, self.attack.name
            result.hit_step, result.hit_timestep = outcome.hit_step, outcome.hit_timestep
            if self.store is not None:
                self.store.put_prompt(self._stored_prompt(case, content, result))

    def _stored_prompt(self, case: Case, content: list[int], result: CaseResult) -> StoredPrompt:
        settings = self.renderer.settings
        return StoredPrompt(
            concept=self.concept, case_prompt=case.prompt, seed=case.seed, guidance=case.guidance,
            content_ids=content, adversarial_ids=result.adversarial_ids, text=result.adversarial_text or "",
            tokenizer=self.tokenizer_fingerprint,
            render={"scheduler": settings.scheduler, "steps": settings.steps, "height": settings.height, "width": settings.width},
            broke=self.model.fingerprint, broke_source=self.model.source, judge=self.judge.name,
            score=float(result.verdict.get("score", 0.0)), found_by=self.attack.name,
        )

    def _save(self, image: Any, case: Case, kind: str, result: CaseResult) -> None:
        if self.image_dir is None or image is None:
            return
        self.image_dir.mkdir(parents=True, exist_ok=True)
        path = self.image_dir / f"{case.case_id}_{kind}.png"
        image.save(path)
        result.images[kind] = str(path)


def run_spec(
    spec: Any,
    model: Model,
    base: Model | None,
    *,
    budget: str | None = None,
    image_dir: str | Path | None = None,
    progress: bool | None = None,
    store: Store | None = None,
    replay_only: bool = False,
    shard: tuple[int, int] | None = None,
    batch_size: int | str | None = None,
    compile_unet: bool = False,
) -> tuple[GateResult, Any]:
    """Run a declared gate (a :class:`~pytest_unlearnatk.spec.GateSpec`) and judge it against max_asr.

    ``budget`` (the run's ``--unlearn-budget``) overrides the spec's own; the default is ``reference``.
    ``batch_size`` (the run's ``--unlearn-batch``) likewise overrides the spec's ``batch``; default automatic.
    Returns the full result and its :class:`~pytest_unlearnatk.report.GateRecord`.
    """
    from .report import GateRecord

    budget_name = budget or spec.budget or "reference"
    settings = {"n_tokens": spec.n_tokens} if spec.n_tokens else {}
    start = time.perf_counter()
    result = run_gate(
        model, load_cases(spec.prompts, limit=spec.limit), spec.judge, attack=spec.attack, budget=budget_name,
        base=base, render=RenderSettings(**spec.render), image_dir=image_dir, progress=progress, concept=spec.concept,
        store=store, replay_only=replay_only, shard=shard, batch_size=batch_size or spec.batch or "auto",
        compile_unet=compile_unet, **settings,
    )
    concept = spec.concept or spec.judge_label()
    shown_budget = budget_name if result.attack in ("unlearndiffatk", "random") else "-"
    record = GateRecord.from_result(spec.name, concept, shown_budget, spec.max_asr, result, time.perf_counter() - start)
    return result, record
