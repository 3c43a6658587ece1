"""Gate declarations: what a marker or a YAML suite entry asks for, checked before anything runs.

One set of keys for both ways of declaring a gate:

    concept, prompts, max_asr, judge, attack, budget, limit, n_tokens, check_text, candidates_per_check,
    position_choices, render, batch, max_new_broken, name (YAML only)

Everything here is pure Python (no torch): a bad declaration fails at collection time with the
file, the key and the fix. What the run's options change (budget, batch) is decided later, by
:class:`~pytest_unlearnatk.options.RunOptions`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .concepts import concept_defaults
from .errors import UnlearnAtkError
from .options import parse_batch
from .registry import Registries, discover, is_reference

# settings the gate hands to its attack as declared (the attack checks them; one without them says so)
ATTACK_SETTING_KEYS = ("check_text", "candidates_per_check", "position_choices")
GATE_KEYS = ("concept", "prompts", "max_asr", "judge", "attack", "budget", "limit", "n_tokens", *ATTACK_SETTING_KEYS,
             "render", "batch", "max_new_broken")
RENDER_KEYS = ("scheduler", "steps", "height", "width", "negative_prompt")
DEFAULT_ATTACK = "unlearndiffatk"


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
    attack: str = DEFAULT_ATTACK
    budget: str | None = None  # None: the run's budget, else the attack's default
    limit: int | None = None
    attack_settings: dict[str, Any] = field(default_factory=dict)  # e.g. n_tokens (declared or the concept's)
    render: dict[str, Any] = field(default_factory=dict)  # RenderSettings fields; {} = the reference's
    batch: int | None = None  # cases optimized at once; None: the run's, else automatic
    where: str = ""  # file or test that declared it, for messages
    gate_id: str = ""  # unique in a run (the test's node id); names its report files. Default: name
    max_new_broken: int | None = None  # with a baseline: fail when more cases newly break than this

    def judge_label(self) -> str:
        if isinstance(self.judge, str):
            return self.judge
        if isinstance(self.judge, Mapping):
            return str(self.judge.get("name", "?"))
        return getattr(self.judge, "__qualname__", type(self.judge).__name__)


def parse_gate(
    declared: Mapping[str, Any], *, where: str, base_dir: Path, name: str, allow_callables: bool = True,
    registries: Registries | None = None, gate_id: str | None = None,
) -> GateSpec:
    """Check one declaration (marker kwargs or a YAML mapping) and fill in the concept's defaults.

    Names (attack, judge, prompt set, concept) are looked up in ``registries`` (default: the
    installed plug-ins); the attack's budget and settings are checked by the attack itself.
    """
    registries = registries or discover()
    unknown = sorted(set(declared) - set(GATE_KEYS))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; the keys of a gate are: {', '.join(GATE_KEYS)}")

    concept = declared.get("concept")
    if concept is not None and not isinstance(concept, str):
        raise SpecError(f"{where}: 'concept' must be a string like 'nudity' or 'church', got {concept!r}")
    try:
        defaults = concept_defaults(concept, registries.concepts) if concept else None
        prompts = _prompts(declared.get("prompts"), where, base_dir)
    except UnlearnAtkError as error:
        raise SpecError(f"{where}: {error}") from None

    max_asr = declared.get("max_asr")
    if isinstance(max_asr, str) and _is_number(max_asr):
        raise SpecError(f"{where}: 'max_asr' is the text {max_asr!r}, not a number (quoted, or written like 2e-1, "
                        f"which YAML reads as text); write it as a plain decimal: {float(max_asr)!r}")
    if isinstance(max_asr, bool) or not isinstance(max_asr, (int, float)):
        raise SpecError(f"{where}: 'max_asr' must be a number between 0 and 1 (e.g. 0.2 for 20%), got {max_asr!r}")
    if not 0.0 <= float(max_asr) <= 1.0:
        raise SpecError(f"{where}: 'max_asr' is {max_asr}; it is a fraction between 0 and 1 (write 0.2, not 20)")

    declared_judge = declared.get("judge")
    judge = _judge(defaults.judge if declared_judge is None and defaults else declared_judge, concept, where,
                   allow_callables, registries)
    attack = declared.get("attack", DEFAULT_ATTACK)
    budget = declared.get("budget")
    limit = _positive_int(declared, "limit", where)
    batch = _parsed(declared, "batch", parse_batch, where)
    max_new_broken = declared.get("max_new_broken")
    if max_new_broken is not None and (isinstance(max_new_broken, bool) or not isinstance(max_new_broken, int)
                                       or max_new_broken < 0):
        raise SpecError(f"{where}: 'max_new_broken' must be a whole number >= 0 (0: no case may newly break), "
                        f"got {max_new_broken!r}")
    settings = {"n_tokens": n} if (n := _positive_int(declared, "n_tokens", where)) is not None else {}
    for key in ATTACK_SETTING_KEYS:  # checked by the attack: it must take the setting, with a valid value
        if key in declared:
            settings[key] = declared[key]
    attack_settings = _check_attack(attack, budget, settings, defaults, where, registries)
    return GateSpec(
        name=name, concept=concept, prompts=prompts, max_asr=float(max_asr), judge=judge, attack=attack,
        budget=budget, limit=limit, attack_settings=attack_settings, render=_render(declared.get("render"), where),
        batch=batch, where=where, gate_id=gate_id or name, max_new_broken=max_new_broken,
    )


def _is_number(text: str) -> bool:
    """Text of a finite number ("nan" and "inf" are not: they get the plain range error)."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _prompts(prompts: Any, where: str, base_dir: Path) -> str | list[Any]:
    from .cases import resolve_prompt_set

    if prompts is None:
        raise SpecError(f"{where}: 'prompts' is missing: give a CSV (I2P schema), YAML or JSON file, or a list of prompts")
    if isinstance(prompts, str):
        prompts = resolve_prompt_set(prompts)  # a registered set or module:callable -> its file or list
    if isinstance(prompts, (str, Path)):
        path = Path(prompts).expanduser()
        path = path if path.is_absolute() else (base_dir / path)
        if path.is_dir():
            raise SpecError(f"{where}: 'prompts' {path} is a directory; give a .csv, .yaml or .json file in it")
        if not path.is_file():
            raise SpecError(f"{where}: 'prompts' file {path} does not exist (relative paths start at {base_dir})")
        return str(path.resolve())
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise SpecError(f"{where}: 'prompts' is an empty list")
        return list(prompts)
    raise SpecError(f"{where}: 'prompts' must be a file path or a list of prompts, got {type(prompts).__name__}")


def _judge(judge: Any, concept: str | None, where: str, allow_callables: bool, registries: Registries) -> Any:
    if isinstance(judge, str) and not judge.strip():
        raise SpecError(f"{where}: 'judge' is empty; give a judge name or 'module:function', or leave the key out "
                        "for the concept's default judge")
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
    if isinstance(judge, Mapping) and not isinstance(judge_name, str):
        raise SpecError(f"{where}: 'judge' {dict(judge)!r} needs a 'name' (text), e.g. {{name: imagenet, label: church}}")
    if isinstance(judge_name, str) and is_reference(judge_name) and judge_name not in registries.judges:
        from .judges.base import CallableJudge

        try:
            target = registries.judges.get(judge_name)
            if not isinstance(target, type):  # a function is the judge itself: can it judge?
                CallableJudge(target, name=judge_name)
        except UnlearnAtkError as error:
            raise SpecError(f"{where}: 'judge': {error}") from None
    if isinstance(judge_name, str) and not is_reference(judge_name) and judge_name not in registries.judges:
        raise SpecError(
            f"{where}: 'judge' {judge_name!r} is not a registered judge ({', '.join(registries.judges.names())}); "
            "or give 'module:function' for your own"
        )
    return judge


def _check_attack(attack: Any, budget: Any, settings: dict[str, Any], defaults: Any, where: str,
                  registries: Registries) -> dict[str, Any]:
    """The attack's settings for this gate (declared ones, then the concept's defaults the attack
    takes), checked by building the attack once; no model is touched."""
    from .attacks.base import SettingError, accepted_settings, check_attack_class, configure_attack

    if not isinstance(attack, str):
        raise SpecError(f"{where}: 'attack' must be a registered name or 'module:Class', got {attack!r}")
    try:
        attack_class = check_attack_class(registries.attacks.get(attack))
    except UnlearnAtkError as error:
        raise SpecError(f"{where}: 'attack': {error}") from None
    if defaults is not None and "n_tokens" in accepted_settings(attack_class):
        settings = {"n_tokens": defaults.n_tokens, **settings}
    try:
        configure_attack(attack_class, budget, **settings)
    except SettingError as error:
        raise SpecError(f"{where}: '{error.key}' {error.detail}") from None
    except UnlearnAtkError as error:
        raise SpecError(f"{where}: {error}") from None
    return settings


def _render(value: Any, where: str) -> dict[str, Any]:
    """Render settings of a gate (scheduler, steps, height, width, negative_prompt), checked."""
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


def _parsed(declared: Mapping[str, Any], key: str, parse: Callable[[Any], Any], where: str) -> Any:
    """A key checked by the parser the run's option of the same meaning uses."""
    try:
        return parse(declared.get(key))
    except ValueError as error:
        raise SpecError(f"{where}: '{key}' is {declared.get(key)!r}: {error}") from None


def _positive_int(declared: Mapping[str, Any], key: str, where: str) -> int | None:
    value = declared.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"{where}: '{key}' must be a positive whole number, got {value!r}")
    return value
