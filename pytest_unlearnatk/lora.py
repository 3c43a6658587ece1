"""Fuse a LoRA / adapter file into a pipeline's UNet and text encoder, strictly.

Every adapted module gets ``W += scale * alpha / rank * up @ down`` (computed in float32), which is
what diffusers' ``fuse_lora`` and PEFT's ``merge`` do. The file's module names are matched to the
pipeline's own modules (diffusers, PEFT and kohya names, and the older diffusers attention-processor
names); a module the pipeline lacks, or a shape that does not fit, fails with its name: nothing
is fused partially. ``alpha`` comes from the file's ``.alpha`` entries (kohya, diffusers), from the
LoRA metadata diffusers writes into a safetensors header, or from ``adapter_config.json`` beside
a PEFT file; without any, alpha equals the rank (scale 1), as diffusers and PEFT assume.

No PEFT import is needed: the arithmetic is a few matrix products.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UnlearnAtkError
from .formats import KOHYA_PREFIXES, PEFT_PREFIX, DetectedFormat, lora_component, lora_split, normalize_lora_key

# the text encoder's attention in the old diffusers attention-processor names
_OLD_TEXT_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


@dataclass
class LoraPair:
    """One adapted module: its down (A) and up (B) matrices and alpha (None: the rank)."""

    component: str
    name: str  # as written in the file (after the component prefix)
    down: Any = None
    up: Any = None
    alpha: float | None = None


def read_pairs(state: dict[str, Any], found: DetectedFormat, path: Path) -> list[LoraPair]:
    """The file's LoRA modules with their matrices and alphas; unknown entries fail."""
    pairs: dict[str, LoraPair] = {}
    alphas: dict[str, float] = {}
    stray = []
    for key, value in state.items():
        key = normalize_lora_key(key)
        if key.endswith(".alpha"):
            alphas[key[: -len(".alpha")]] = float(value.float().item())
            continue
        split = lora_split(key)
        if split is None:
            stray.append(key)
            continue
        module, which = split
        pair = pairs.setdefault(module, LoraPair(lora_component(module, found.layout), module))
        setattr(pair, which, value)
    if stray:
        raise UnlearnAtkError(f"{path}: a LoRA file, but {len(stray)} of its keys are neither LoRA matrices nor "
                              f"alphas (e.g. {stray[:3]}); is it a LoRA for a Stable Diffusion UNet / text encoder?")
    half = [name for name, pair in pairs.items() if pair.down is None or pair.up is None]
    if half:
        raise UnlearnAtkError(f"{path}: {len(half)} LoRA modules have only one of their two matrices (e.g. {half[:3]})")
    for name, pair in pairs.items():
        pair.alpha = alphas.get(name)
    _alphas_from_config(list(pairs.values()), path)
    return list(pairs.values())


def _alphas_from_config(pairs: list[LoraPair], path: Path) -> None:
    """Alphas for modules whose file has none: diffusers' safetensors metadata, or PEFT's adapter_config.json."""
    configs: dict[str, dict] = {}
    metadata = _safetensors_metadata(path).get("lora_adapter_metadata")
    if metadata:
        packed = json.loads(metadata)
        for component in ("unet", "text_encoder"):
            values = {k[len(component) + 1:]: v for k, v in packed.items() if k.startswith(component + ".")}
            if values:
                configs[component] = values
    adapter_config = path.parent / "adapter_config.json"
    if not configs and adapter_config.is_file():
        config = json.loads(adapter_config.read_text("utf-8"))
        configs = {"unet": config, "text_encoder": config}
    for component, config in configs.items():
        if config.get("alpha_pattern") or config.get("rank_pattern"):
            raise UnlearnAtkError(f"{path}: its adapter config sets alpha_pattern/rank_pattern (per-module alphas), "
                                  "which we do not read yet; fuse the adapter into the model and pass the model instead")
        for pair in pairs:
            if pair.component == component and pair.alpha is None and "lora_alpha" in config:
                rank = pair.down.shape[0]
                # rsLoRA scales by alpha / sqrt(rank): the same as alpha' / rank with alpha' = alpha * sqrt(rank)
                pair.alpha = float(config["lora_alpha"]) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)


def _safetensors_metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def fuse_lora(pipeline: Any, state: dict[str, Any], found: DetectedFormat, path: Path, scale: float) -> dict[str, int]:
    """Fuse the LoRA file ``state`` into ``pipeline`` in place; returns the fused modules per component."""
    import torch

    pairs = read_pairs(state, found, path)
    indexes = {name: _ModuleIndex(getattr(pipeline, name)) for name in {pair.component for pair in pairs}}
    targets = [(pair, indexes[pair.component].find(pair, found.layout)) for pair in pairs]
    missing = [f"{pair.component}: {pair.name}" for pair, module in targets if module is None]
    if missing:
        raise UnlearnAtkError(
            f"{path}: {len(missing)} of its {len(pairs)} LoRA modules are not in the base pipeline "
            f"(e.g. {missing[:3]}). Is it a LoRA for this base model? Check --unlearn-base / base=."
        )
    for pair, module in targets:  # every module is checked before any is changed: nothing is fused partially
        up, down, weight = pair.up, pair.down, module.weight
        if up.shape[0] != weight.shape[0] or up.flatten(1).shape[1] != down.shape[0] or \
                up.shape[0] * down.flatten(1).shape[1] != weight.numel():
            raise UnlearnAtkError(
                f"{path}: LoRA module {pair.component}.{pair.name} has matrices {tuple(up.shape)} x {tuple(down.shape)}, "
                f"which do not fit the base pipeline's weight {tuple(weight.shape)}; the base is a different model"
            )
    with torch.no_grad():
        for pair, module in targets:  # one module at a time: only one update in memory
            weight, rank = module.weight, pair.down.shape[0]
            alpha = rank if pair.alpha is None else pair.alpha
            delta = (pair.up.float().flatten(1) @ pair.down.float().flatten(1)).reshape(weight.shape)
            weight.copy_((weight.float() + delta.to(weight.device) * (scale * alpha / rank)).to(weight.dtype))
    counts: dict[str, int] = {}
    for pair in pairs:
        counts[pair.component] = counts.get(pair.component, 0) + 1
    return counts


class _ModuleIndex:
    """A component's modules by name, and by kohya's flattened name (dots as underscores)."""

    def __init__(self, component: Any) -> None:
        self.modules = dict(component.named_modules())
        self.flat = {name.replace(".", "_"): name for name in self.modules}

    def find(self, pair: LoraPair, layout: str) -> Any:
        """The module a file's LoRA module adapts (one with a weight: Linear, Conv2d), or None."""
        for name in _candidate_names(pair, layout, self.flat):
            module = self.modules.get(name)
            if module is not None and getattr(module, "weight", None) is not None:
                return module
        return None


def _candidate_names(pair: LoraPair, layout: str, flat_names: dict[str, str]) -> list[str]:
    name = pair.name
    if layout == "kohya":
        flat = name[next(len(p) for p in KOHYA_PREFIXES if name.startswith(p)):]
        return [flat_names.get(flat, ""), flat_names.get(flat.removeprefix("text_model_"), "")]
    name = name.removeprefix(PEFT_PREFIX).removeprefix(pair.component + ".")
    names = [name]
    if ".processor." in name or name.endswith((".to_q", ".to_k", ".to_v", ".to_out")):
        old = name.replace(".processor.", ".")  # attention-processor LoRA: attn1.processor.to_q -> attn1.to_q
        if pair.component == "text_encoder":
            head, _, last = old.rpartition(".")
            old = f"{head}.{_OLD_TEXT_NAMES.get(last, last)}"
        elif old.endswith(".to_out"):
            old += ".0"
        names.append(old)
    return names + [n.removeprefix("text_model.") for n in names if n.startswith("text_model.")]
