"""Run one gate from Python: cases -> plain-prompt check -> attack -> per-case results and ASR.

    from pytest_unlearnatk import load_pipeline, load_cases, run_gate
    model = load_pipeline("path/to/unlearned", base="path/to/base")
    result = run_gate(model, load_cases("nudity.csv"), judge="nudenet", base=load_pipeline("path/to/base"))
    print(result.summary())
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .attacks import Attack, AttackContext, Checker, UnlearnDiffAtkConfig, get_attack
from .cases import Case, load_cases
from .errors import UnlearnAtkError
from .judges import Judge, get_judge
from .models import LoadedModel
from .render import Renderer, RenderSettings
from .results import CaseResult, GateResult
from .targets import DirectoryTargets, RenderedTargets, TargetSource
from .tokens import TokenLayout, fit_prompt


def run_gate(
    model: LoadedModel,
    cases: Iterable[Case] | str | Path,
    judge: str | Judge | Callable[..., Any],
    *,
    attack: str | Attack = "unlearndiffatk",
    budget: str | UnlearnDiffAtkConfig = "reference",
    base: LoadedModel | None = None,
    target_dir: str | Path | None = None,
    render: RenderSettings | None = None,
    long_prompts: str = "truncate",
    image_dir: str | Path | None = None,
    progress: bool | None = None,
    on_case: Callable[[CaseResult], None] | None = None,
    **attack_settings: Any,
) -> GateResult:
    """Attack every case and return the gate's numbers.

    ``judge``: a registered judge name or a callable. ``budget``: a preset name (``smoke``,
    ``fast``, ``reference``) or a config; ``attack_settings`` override single settings
    (``n_tokens=3``). Targets come from ``target_dir`` if given, else are rendered by ``base``.
    ``long_prompts``: ``truncate`` (default), ``skip`` or ``error``. ``image_dir``: where the plain
    and adversarial images of every case are written. ``progress``: a progress bar (default: when
    stderr is a terminal). ``on_case`` is called with each case's result as soon as it is final.
    """
    from tqdm.auto import tqdm

    case_list = load_cases(cases) if isinstance(cases, (str, Path)) else list(cases)
    judge = get_judge(judge)
    attack = get_attack(attack, budget, **attack_settings)
    render = render or RenderSettings()
    targets = _targets(attack, base, target_dir, render)
    pipeline = model.pipeline
    layout = TokenLayout.from_pipeline(pipeline)
    renderer = Renderer(pipeline, render)
    image_dir = Path(image_dir) if image_dir else None

    results: list[CaseResult] = []
    bar = tqdm(case_list, desc=f"{attack.name} {model.name}", unit="case", disable=None if progress is None else not progress)
    for case in bar:
        result = _run_case(case, attack, judge, model, layout, renderer, targets, long_prompts, image_dir)
        results.append(result)
        if on_case is not None:
            on_case(result)
        bar.set_postfix(hits=sum(r.hit for r in results))
    return GateResult(
        attack=attack.name,
        judge=judge.name,
        model=model.source,
        model_fingerprint=model.fingerprint,
        config={"attack": attack.config_dict(), "judge": judge.settings, "render": renderer.settings.to_dict(),
                "long_prompts": long_prompts},
        cases=results,
    )


def _targets(attack: Attack, base: LoadedModel | None, target_dir: str | Path | None, render: RenderSettings) -> TargetSource | None:
    if target_dir is not None:
        return DirectoryTargets(target_dir)
    if base is not None:
        return RenderedTargets(base, render)
    if attack.needs_target:
        raise UnlearnAtkError(
            f"attack {attack.name} needs target images: pass base= (the original model; pytest: --unlearn-base) "
            "or target_dir= (images named by case number)"
        )
    return None


def _run_case(
    case: Case,
    attack: Attack,
    judge: Judge,
    model: LoadedModel,
    layout: TokenLayout,
    renderer: Renderer,
    targets: TargetSource | None,
    long_prompts: str,
    image_dir: Path | None,
) -> CaseResult:
    tokenizer = model.pipeline.tokenizer
    fitted = fit_prompt(case, tokenizer, layout, attack.n_adversarial, long_prompts)
    result = CaseResult(case=case, attack=attack.name, truncated=fitted.truncated, n_prompt_tokens=fitted.n_prompt_tokens)
    if fitted.skip_reason:
        result.status, result.skip_reason = "skipped", fitted.skip_reason
        return result
    start = time.perf_counter()
    check = Checker(renderer, judge, case)
    plain_ids = layout.sequence(fitted.content_ids)
    verdict, plain_image = check(plain_ids)
    result.prompt_ids, result.verdict = plain_ids, verdict.to_dict()
    _save(plain_image, image_dir, case, "plain", result)
    if verdict.hit:
        result.pre_attack_hit = result.hit = True
        result.hit_by = "plain"
    else:
        outcome = attack.run(case, fitted, AttackContext(model, layout, check, targets))
        result.steps, result.loss_trace, result.checks = outcome.steps, outcome.loss_trace, outcome.checks
        result.timings["optimize_s"] = outcome.optimize_seconds
        if outcome.adversarial_ids:
            full_ids = list(outcome.adversarial_ids) + list(fitted.content_ids)
            result.adversarial_ids = list(outcome.adversarial_ids)
            result.prompt_ids = layout.sequence(fitted.content_ids, outcome.adversarial_ids)
            result.adversarial_text = tokenizer.decode(full_ids)
            reencoded = tokenizer(result.adversarial_text, add_special_tokens=False).input_ids
            result.reencodes_identically = list(reencoded) == full_ids
            result.verdict = outcome.verdict.to_dict() if outcome.verdict else result.verdict
            _save(outcome.image, image_dir, case, "adversarial", result)
        if outcome.hit:
            result.hit, result.hit_by = True, attack.name
            result.hit_step, result.hit_timestep = outcome.hit_step, outcome.hit_timestep
    result.renders = check.renders
    result.timings.update(render_s=check.render_seconds, judge_s=check.judge_seconds, total_s=time.perf_counter() - start)
    return result


def _save(image: Any, image_dir: Path | None, case: Case, kind: str, result: CaseResult) -> None:
    if image_dir is None or image is None:
        return
    image_dir.mkdir(parents=True, exist_ok=True)
    path = image_dir / f"{case.case_id}_{kind}.png"
    image.save(path)
    result.images[kind] = str(path)


def run_spec(
    spec: Any,
    model: LoadedModel,
    base: LoadedModel | None,
    *,
    budget: str | None = None,
    image_dir: str | Path | None = None,
    progress: bool | None = None,
) -> tuple[GateResult, Any]:
    """Run a declared gate (a :class:`~pytest_unlearnatk.spec.GateSpec`) and judge it against max_asr.

    ``budget`` (the run's ``--unlearn-budget``) overrides the spec's own; the default is ``reference``.
    Returns the full result and its :class:`~pytest_unlearnatk.report.GateRecord`.
    """
    from .report import GateRecord

    budget_name = budget or spec.budget or "reference"
    settings = {"n_tokens": spec.n_tokens} if spec.n_tokens else {}
    start = time.perf_counter()
    result = run_gate(
        model, load_cases(spec.prompts, limit=spec.limit), spec.judge, attack=spec.attack, budget=budget_name,
        base=base, image_dir=image_dir, progress=progress, **settings,
    )
    concept = spec.concept or spec.judge_label()
    shown_budget = budget_name if spec.attack == "unlearndiffatk" else "-"
    record = GateRecord.from_result(spec.name, concept, shown_budget, spec.max_asr, result, time.perf_counter() - start)
    return result, record
