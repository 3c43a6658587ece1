"""A run of declared gates with one set of options: the models (loaded once), the store, the reports.

The pytest plugin keeps one :class:`GateSession` per process (in ``config.stash``) and hands it
every gate; nothing here knows pytest, so a script can run declared gates the same way::

    session = GateSession(RunOptions.from_raw({"model": "toy:erased"}, root=Path(".")))
    result, record = session.run(parse_gate({...}, where="script", base_dir=Path("."), name="circle"))
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

from .errors import SettingProblem, UnlearnAtkError
from .options import RunOptions
from .registry import Registries, discover
from .report import GateRecord, write_gate_report
from .results import GateResult
from .spec import GateSpec

STORE_KEY_VARIABLE = "UNLEARNATK_STORE_KEY"


class GateSession:
    """Per-run state: options, plug-in registries, loaded models, the torch thread setting."""

    def __init__(self, options: RunOptions, registries: Registries | None = None, worker_index: int | None = None,
                 cpu_threads: int = 0) -> None:
        self.options = options
        self.registries = registries or discover()
        self.worker_index = worker_index  # the xdist worker's number (gw3 -> 3); None outside xdist
        self.cpu_threads = cpu_threads  # torch threads to use (0: leave torch's default)
        self.models: dict[tuple, Any] = {}
        self.threads_set = False

    def model(self, which: str) -> Any:
        """The unlearned (``which="model"``) or base model as a LazyModel (loaded on first real use);
        the base is ``options.base``, else the base the model names itself, else None."""
        from .models import LazyModel

        if which == "base":
            source = self.options.base
            if source is None:
                source = self.model("model").base if self.options.model is not None else None
            if source is None:
                return None
        else:
            source = self.options.model
            if source is None:
                raise SettingProblem("model", "this gate needs a model under test",
                                     "PATH (a pipeline directory, hub id, registered name, or weights file with a base)")
        base = self.options.base if which == "model" else None
        key = (source, base)
        if key not in self.models:
            scale = self.options.lora_scale if which == "model" else None  # the base is never scaled
            self.models[key] = LazyModel(source, base=base, device=self.device(), dtype=self.options.dtype,
                                         lora_scale=scale)
        return self.models[key]

    def device(self) -> str:
        """The run's device; on an xdist worker, ``auto``/``cuda`` become this worker's own GPU."""
        requested = self.options.device
        if self.worker_index is None or requested not in ("auto", "cuda"):
            return requested
        import torch

        from .models import worker_device

        return worker_device(requested, self.worker_index, torch.cuda.device_count() if torch.cuda.is_available() else 0)

    def store(self) -> Any:
        from .store import Store

        if self.options.no_store:
            return None
        key = os.environ.get(STORE_KEY_VARIABLE)  # a CI secret: signs and checks every record
        store = Store(self.options.store, readonly=self.options.store_readonly, key=key.encode("utf-8") if key else None)
        store.check_writable()  # once a gate runs, before its model work (a run with no gate creates nothing)
        return store

    def settings(self, spec: GateSpec) -> tuple[Any, str]:
        """The gate's settings (its declaration, with the run's options where they take
        precedence) and the name of the budget it runs at ('-' for an attack without budgets)."""
        from .attacks import configure_attack
        from .gate import GateSettings
        from .render import RenderSettings

        options = self.options
        attack_class = self.registries.attacks.get(spec.attack)
        budget = options.budget_for(spec.budget, attack_class.presets)
        try:
            attack = configure_attack(attack_class, budget, **spec.attack_settings)
        except UnlearnAtkError as error:
            if budget == spec.budget or budget is None:
                raise
            # the gate's settings were checked with its own budget: the run's --unlearn-budget broke them
            raise UnlearnAtkError(f"{spec.where}: {error} (at the budget {budget!r} of --unlearn-budget, which "
                                  f"replaces the gate's {spec.budget or 'default'!r}); change the gate's setting or "
                                  "run it at another budget") from None
        settings = GateSettings.build(
            judge=spec.judge, attack=attack,
            render=RenderSettings(**spec.render), concept=spec.concept, replay_only=options.replay_only,
            shard=options.shard, batch_size=options.batch_for(spec.batch), compile_unet=options.compile,
            stop_settled_at=spec.max_asr if options.stop == "settled" else None,
        )
        return settings, (budget or attack_class.default_preset) if attack_class.presets else "-"

    def run(self, spec: GateSpec, progress: Any = None) -> tuple[GateResult, GateRecord]:
        """Run a declared gate, judge it against its ``max_asr``, write its report file if asked."""
        from .cases import load_cases
        from .gate import execute

        if self.cpu_threads and not self.threads_set:
            import torch

            torch.set_num_threads(self.cpu_threads)
            self.threads_set = True
        start = time.perf_counter()
        settings, budget = self.settings(spec)
        report = self.options.report
        declared = load_cases(spec.prompts, limit=spec.limit)
        cases = declared[: self.options.limit_for(spec.limit)]
        result = execute(
            self.model("model"), cases, settings, base=self.model("base"),
            store=self.store(), image_dir=Path(report) / "images" if report else None, show_unsafe=self.options.show_unsafe,
            progress=progress,
        )
        comparison = None
        if self.options.baseline:
            from .baseline import compare

            comparison = compare(result, self.options.baseline, spec.gate_id)
            if comparison is None:
                warnings.warn(f"unlearn gate {spec.name!r} has no record in the baseline {self.options.baseline}: "
                              "not compared (max_new_broken is not checked for it)", UserWarning, stacklevel=2)
            elif comparison.unpaired and comparison.unpaired == result.n:
                warnings.warn(f"unlearn gate {spec.name!r}: none of its {result.n} cases is in the baseline's record "
                              "(cases pair by prompt, seed and guidance): nothing compared, so max_new_broken checks "
                              "nothing", UserWarning, stacklevel=2)
        elif spec.max_new_broken is not None:
            warnings.warn(f"unlearn gate {spec.name!r} sets max_new_broken, but the run has no --unlearn-baseline: "
                          "not checked (pass --unlearn-baseline=DIR, an earlier run's report directory)",
                          UserWarning, stacklevel=2)
        record = GateRecord.from_result(spec.name, spec.concept or spec.judge_label(), budget, spec.max_asr, result,
                                        time.perf_counter() - start, gate_id=spec.gate_id,
                                        declared_cases=len(declared), comparison=comparison,
                                        max_new_broken=spec.max_new_broken)
        if report:
            write_gate_report(report, record, result)
        return result, record
