"""The run's options, as one frozen and checked object, and the rules that combine them with a gate's.

:class:`RunOptions` is built once per run (the pytest plugin builds it from the command line and
the ini file in ``pytest_configure``) and everything after that trusts it. Each field carries its
own help text and parser in its metadata: the plugin declares one ``--unlearn-<field>`` option
and one ``unlearn_<field>`` ini key per field, so adding an option means adding a field here.

The parsers (:func:`parse_batch`, :func:`parse_shard`, :func:`parse_device`, :func:`parse_dtype`,
:func:`parse_lora_scale`)
are also what ``run_gate`` and gate declarations use: each value is checked in one place.
Precedence (command line over ini is pytest's; the run's options over a gate's own declaration)
lives in :meth:`RunOptions.budget_for`, :meth:`RunOptions.batch_for` and
:meth:`RunOptions.limit_for`, nowhere else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
                 "bfloat16": "bfloat16", "bf16": "bfloat16"}


class OptionError(ValueError):
    """A run option is wrong. ``names`` are the fields concerned; the message says how to fix it.

    The parsers below raise a plain ValueError whose message is the fix; the caller says which
    option or argument held the value."""

    def __init__(self, names: tuple[str, ...], value: Any, message: str) -> None:
        super().__init__(message)
        self.names, self.value, self.message = names, value, message


# --- parsers: raw text (or an already typed value) -> the checked value; ValueError says the fix ---


def parse_limit(value: Any) -> int | None:
    """A number of cases >= 1 (text from a command line, or an int); None stays None."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("give a whole number of cases >= 1 (e.g. 8)")
    return value


def parse_batch(value: Any) -> int | None:
    """Cases optimized at once: a whole number >= 1, or ``auto``/None (decided from free memory)."""
    if isinstance(value, str) and value.strip() == "auto":
        return None
    try:
        return parse_limit(value)
    except ValueError:
        raise ValueError("give a whole number of cases >= 1 (e.g. 8), or auto") from None


def parse_report_dir(value: Any) -> str | None:
    """An earlier run's report directory (it holds ``gates/``, written by ``--unlearn-report``)."""
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    if not (path / "gates").is_dir():
        raise ValueError(f"{path} holds no gates/ folder: give the report directory an earlier run wrote")
    return str(path.resolve())


STOP_RULES = ("never", "settled")


def parse_stop(value: Any) -> str:
    """When a gate may stop early: ``never`` (default) or ``settled`` (once its verdict cannot change)."""
    text = "never" if value is None else str(value).strip()
    if text not in STOP_RULES:
        raise ValueError(f"use one of {', '.join(STOP_RULES)}")
    return text


def parse_shard(value: Any) -> tuple[int, int] | None:
    """``"I/N"`` or ``(I, N)`` with 1 <= I <= N: the I-th of N slices of each gate's cases."""
    if value is None:
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
        value = (int(match[1]), int(match[2])) if match else value
    ok = (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
          and 1 <= value[0] <= value[1])
    if not ok:
        raise ValueError("give I/N with 1 <= I <= N, e.g. 1/4 (in Python: (1, 4))")
    return value


def parse_device(value: Any) -> str:
    """``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N`` (whether it exists is checked on loading)."""
    text = "auto" if value is None else str(value).strip()
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise ValueError("use auto, cpu, cuda or cuda:N")
    return text


def parse_dtype(value: Any) -> str:
    """``auto`` or a dtype name (float32/fp32, float16/fp16, bfloat16/bf16), as its full name."""
    text = "auto" if value is None else str(value).strip().lower()
    if text != "auto" and text not in DTYPE_ALIASES:
        raise ValueError("use auto, float32, float16 or bfloat16")
    return DTYPE_ALIASES.get(text, text)


def parse_lora_scale(value: Any) -> float:
    """How strongly a LoRA file's update is applied: a finite number (1 = as trained, 0 = the base)."""
    if value is None:
        return 1.0
    try:
        scale = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError("give a number, e.g. 1 (as trained), 0.5, or 0 (the base model)") from None
    if isinstance(value, bool) or not math.isfinite(scale):
        raise ValueError("give a finite number, e.g. 1 (as trained), 0.5, or 0 (the base model)")
    return scale


def parse_budget(value: Any) -> str | None:
    """A preset name that at least one registered attack has (``smoke``, ``fast``, ``reference``)."""
    if value is None:
        return None
    from .registry import discover, preset_names

    known = preset_names(discover().attacks)
    if value not in known:
        raise ValueError(f"use one of {', '.join(known)}")
    return value


def _option(metavar: str, help_text: str, parse: Callable[[Any], Any] | None = None, default: Any = None) -> Any:
    return field(default=default, metadata={"metavar": metavar, "help": help_text, "parse": parse})


def _flag(help_text: str) -> Any:
    return field(default=False, metadata={"flag": True, "help": help_text})


@dataclass(frozen=True)
class RunOptions:
    """Settings of a whole run: which models, where results go, what every gate may override."""

    model: str | None = _option("PATH", "the unlearned model under test: pipeline directory, hub id, original "
                                "single-file checkpoint, UNet / text-encoder weights or LoRA file (with a base), "
                                "or a registered name such as toy:erased")
    base: str | None = _option("PATH", "the original model: renders target images; the base a weights or LoRA file "
                               "is applied over, and the configs a single-file checkpoint is read with (default: "
                               "the base the model names itself, if any)")
    lora_scale: float = _option("SCALE", "strength of a LoRA / adapter model file: its update is fused times SCALE "
                                "(default 1: as trained; 0: the base). Part of the store key", parse_lora_scale, 1.0)
    device: str = _option("DEVICE", "auto (default: cuda when available, else cpu), cpu, cuda, cuda:N",
                          parse_device, "auto")
    dtype: str = _option("DTYPE", "auto (default: float16 on GPU, float32 on CPU), float32, float16, bfloat16",
                         parse_dtype, "auto")
    budget: str | None = _option("PRESET", "attack budget for every gate: smoke, fast, reference "
                                 "(default: each gate's own, else the attack's default)", parse_budget)
    report: str | None = _option("DIR", "directory for the JSON report and the images of every gate")
    store: str | None = _option("DIR", "the adversarial-prompt store (default: .unlearnatk in the rootdir)")
    batch: int | None = _option("N", "cases an attack optimizes at once: a number or auto (default: each gate's "
                                "batch, else auto: as many as memory holds, see docs/performance.md)", parse_batch)
    shard: tuple[int, int] | None = _option("I/N", "run only the I-th of N slices of each gate's cases; the verdict "
                                            "comes from a run with all slices in the store", parse_shard)
    limit: int | None = _option("N", "run only the first N cases of every gate: a quick check (pull requests); "
                                "every report marks such a gate partial", parse_limit)
    stop: str = _option("RULE", "settled: stop a gate as soon as its verdict can no longer change (the ASR is then "
                        "a bound; the cases left are not run); never (default): run every case", parse_stop, "never")
    baseline: str | None = _option("DIR", "the --unlearn-report directory of an earlier run (e.g. the checkpoint last "
                                   "released): every gate is compared with it case by case (gate key max_new_broken)",
                                   parse_report_dir)
    markdown: str | None = _option("PATH", "append the summary as a Markdown table to PATH (e.g. $GITHUB_STEP_SUMMARY)")
    replay_only: bool = _flag("no optimization: judge plain prompts and replay stored adversarial prompts only "
                              "(ASR is a lower bound)")
    no_store: bool = _flag("neither read nor write the store")
    store_readonly: bool = _flag("read the store, never write it (CI on a committed store)")
    compile: bool = _flag("run the attack's UNet through torch.compile (GPU runs of long gates; the first steps compile)")
    show_unsafe: bool = _flag("do not blur images of unsafe concepts (nudity) in the report (its PNG files and HTML page) "
                                "and the store")

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any], root: Path) -> RunOptions:
        """Check raw values (text from a command line or ini file, None when not given) field by
        field. ``root``: where the default store lives (``<root>/.unlearnatk``)."""
        values: dict[str, Any] = {}
        for spec in fields(cls):
            value = raw.get(spec.name)
            if spec.metadata.get("flag"):
                values[spec.name] = bool(value)
            elif isinstance(value, str) and not value.strip():
                raise OptionError((spec.name,), value, "is empty: give a value, or leave the option out for its default")
            elif value is None:
                values[spec.name] = spec.default if spec.metadata["parse"] is None else spec.metadata["parse"](None)
            else:
                try:
                    values[spec.name] = spec.metadata["parse"](value) if spec.metadata["parse"] else str(value)
                except ValueError as error:
                    raise OptionError((spec.name,), value, str(error)) from None
        if values["no_store"] and values["store_readonly"]:
            raise OptionError(("no_store", "store_readonly"), True, "contradict each other; pick one")
        if values["no_store"] and values["replay_only"]:
            raise OptionError(("replay_only", "no_store"), True,
                              "contradict each other: a replay-only run replays what the store holds; drop one")
        if values["no_store"] and values["shard"]:
            raise OptionError(("shard", "no_store"), values["shard"], "shards meet in the store; drop the one without a store")
        if values["baseline"] and values["report"] and Path(values["report"]).expanduser().resolve() == Path(values["baseline"]):
            raise OptionError(("report", "baseline"), values["report"],
                              "are the same directory: this run's report would replace the baseline; use another one")
        values["store"] = str(Path(values["store"] or root / ".unlearnatk").expanduser().resolve())
        if values["report"] and Path(values["report"]).expanduser().resolve() == Path(values["store"]):
            raise OptionError(("report", "store"), values["report"],
                              "are the same directory: the report's images/ would mix with the store's; "
                              "give the report a directory of its own (e.g. unlearn-report)")
        return cls(**values)

    @classmethod
    def declarations(cls) -> list[tuple[str, dict[str, Any]]]:
        """(field name, metadata) of every option, for the plugin to declare them."""
        return [(spec.name, dict(spec.metadata)) for spec in fields(cls)]

    # --- precedence: the run's options over a gate's declaration ---------------------------

    def budget_for(self, declared: str | None, presets: Collection[str]) -> str | None:
        """The budget a gate runs at: the run's, else the gate's, else None (the attack's default).

        ``presets``: the gate's attack's preset names. The run's budget passes over an attack
        that has no budgets at all (``no_attack``); the attack itself rejects a name it lacks.
        """
        return self.budget if self.budget is not None and presets else declared

    def limit_for(self, declared: int | None) -> int | None:
        """Cases a gate runs: the fewer of the run's limit and the gate's own, else all."""
        limits = [limit for limit in (self.limit, declared) if limit is not None]
        return min(limits) if limits else None

    def batch_for(self, declared: int | None) -> int | None:
        """Cases optimized at once: the run's, else the gate's, else None (automatic)."""
        return self.batch or declared

    def to_dict(self) -> dict[str, Any]:
        return {spec.name: getattr(self, spec.name) for spec in fields(self)}
