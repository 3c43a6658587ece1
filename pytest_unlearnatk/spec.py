"""Gate declarations: what a marker or a YAML suite entry asks for, checked before anything runs.

One set of keys for both ways of declaring a gate:

    concept, prompts, max_asr, judge, attack, budget, limit, n_tokens, render, batch, name (YAML only)

Everything here is pure Python (no torch): a bad declaration fails at collection time with the
file, the key and the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .attacks import ATTACKS, PRESETS
from .concepts import concept_defaults
from .judges import JUDGES

GATE_KEYS = ("concept", "prompts", "max_asr", "judge", "attack", "budget", "limit", "n_tokens", "render", "batch")
RENDER_KEYS = ("scheduler", "steps", "height", "width", "negative_prompt")


class SpecError(ValueError):
    """A gate declaration is wrong; the message says where and how to fix it."""


@dataclass(frozen=True)
class GateSpec:
    """A validated gate: which concept, which cases, how to judge and attack, and the threshold."""

    name: str
    concept: str | None
    prompts: str | list[Any]  # a file path (absolute after validation) or an inline list
    max_asr: float
    judge: str | Mapping[str, Any] | Callable[..., Any]
    attack: str = "unlearndiffatk"
    budget: str | None = None  # None: the run's --unlearn-budget, else "reference"
    limit: int | None = None
    n_tokens: int | None = None
    render: dict[str, Any] = field(default_factory=dict)  # RenderSettings fields; {} = the reference's
    batch: int | None = None  # cases optimized at once; None: the run's --unlearn-batch, else automatic
    where: str = ""  # file or test that declared it, for messages
    extra: dict[str, Any] = field(default_factory=dict)

    def judge_label(self) -> str:
        if isinstance(self.judge, str):
            return self.judge
        if isinstance(self.judge, Mapping):
            return str(self.judge.get("name", "?"))
        return getattr(self.judge, "__qualname__", type(self.judge).__name__)


def parse_gate(
    declared: Mapping[str, Any], *, where: str, base_dir: Path, name: str, allow_callables: bool = True
) -> GateSpec:
    """Check one declaration (marker kwargs or a YAML mapping) and fill in the concept's defaults."""
    unknown = sorted(set(declared) - set(GATE_KEYS))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; the keys of a gate are: {', '.join(GATE_KEYS)}")

    concept = declared.get("concept")
    if concept is not None and not isinstance(concept, str):
        raise SpecError(f"{where}: 'concept' must be a string like 'nudity' or 'church', got {concept!r}")
    defaults = concept_defaults(concept) if concept else None

    prompts = declared.get("prompts")
    if prompts is None:
        raise SpecError(f"{where}: 'prompts' is missing: give a CSV (I2P schema), YAML or JSON file, or a list of prompts")
    if isinstance(prompts, str) and prompts.startswith("toy:"):
        from .errors import UnlearnAtkError
        from .toy import resolve_prompt_set

        try:
            prompts = str(resolve_prompt_set(prompts))
        except UnlearnAtkError as error:
            raise SpecError(f"{where}: 'prompts': {error}") from None
    elif isinstance(prompts, (str, Path)):
        path = Path(prompts).expanduser()
        path = path if path.is_absolute() else (base_dir / path)
        if not path.is_file():
            raise SpecError(f"{where}: 'prompts' file {path} does not exist (relative paths start at {base_dir})")
        prompts = str(path.resolve())
    elif isinstance(prompts, (list, tuple)):
        if not prompts:
            raise SpecError(f"{where}: 'prompts' is an empty list")
        prompts = list(prompts)
    else:
        raise SpecError(f"{where}: 'prompts' must be a file path or a list of prompts, got {type(prompts).__name__}")

    max_asr = declared.get("max_asr")
    if isinstance(max_asr, bool) or not isinstance(max_asr, (int, float)):
        raise SpecError(f"{where}: 'max_asr' must be a number between 0 and 1 (e.g. 0.2 for 20%), got {max_asr!r}")
    if not 0.0 <= float(max_asr) <= 1.0:
        raise SpecError(f"{where}: 'max_asr' is {max_asr}; it is a fraction between 0 and 1 (write 0.2, not 20)")

    judge = declared.get("judge") or (defaults.judge if defaults else None)
    if judge is None:
        raise SpecError(
            f"{where}: no judge: concept {concept!r} has no default judge; set 'judge' to a registered name, "
            "'module:function', or (in Python) a callable"
        )
    if callable(judge) and not allow_callables:
        raise SpecError(f"{where}: 'judge' must be a name or 'module:function' here")
    if not (isinstance(judge, (str, Mapping)) or callable(judge)):
        raise SpecError(f"{where}: 'judge' must be a judge name, 'module:function', or a callable; got {judge!r}")

    judge_name = judge.get("name") if isinstance(judge, Mapping) else judge
    if isinstance(judge_name, str) and ":" not in judge_name and judge_name not in JUDGES:
        raise SpecError(
            f"{where}: 'judge' {judge_name!r} is not a registered judge ({', '.join(sorted(JUDGES))}); "
            "or give 'module:function' for your own"
        )

    attack = declared.get("attack", "unlearndiffatk")
    if attack not in ATTACKS:
        raise SpecError(f"{where}: 'attack' is {attack!r}; use one of {', '.join(ATTACKS)}")
    budget = declared.get("budget")
    if budget is not None and budget not in PRESETS:
        raise SpecError(f"{where}: 'budget' is {budget!r}; use one of {', '.join(PRESETS)}")
    limit = _positive_int(declared, "limit", where)
    n_tokens = _positive_int(declared, "n_tokens", where)
    batch = _positive_int(declared, "batch", where)
    if n_tokens is None and defaults is not None:
        n_tokens = defaults.n_tokens
    return GateSpec(
        name=name, concept=concept, prompts=prompts, max_asr=float(max_asr), judge=judge, attack=attack,
        budget=budget, limit=limit, n_tokens=n_tokens, render=_render(declared.get("render"), where), batch=batch,
        where=where,
    )


def _render(value: Any, where: str) -> dict[str, Any]:
    """Render settings of a gate (scheduler, steps, height, width, negative_prompt), checked."""
    from .errors import UnlearnAtkError
    from .render import RenderSettings

    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: 'render' must be a mapping like {{steps: 25}}, got {value!r}")
    unknown = sorted(set(value) - set(RENDER_KEYS))
    if unknown:
        raise SpecError(f"{where}: unknown 'render' key(s) {unknown}; allowed: {', '.join(RENDER_KEYS)}")
    try:
        RenderSettings(**value)
    except (UnlearnAtkError, TypeError) as error:
        raise SpecError(f"{where}: 'render': {error}") from None
    return dict(value)


def _positive_int(declared: Mapping[str, Any], key: str, where: str) -> int | None:
    value = declared.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"{where}: '{key}' must be a positive whole number, got {value!r}")
    return value
