"""Tell what a weights file is from its key names (and tensor shapes), and say it in one line.

Erased models are published in several shapes; :func:`detect` sorts a file into one of
:data:`FORMATS` without building any model, so the store key and the report line can be known
before (or without) loading. Loading itself lives in :mod:`pytest_unlearnatk.models` (whole
components), :mod:`pytest_unlearnatk.lora` (adapters) and :mod:`pytest_unlearnatk.checkpoints`
(original single-file checkpoints); each checks the file strictly against the model it goes into.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UnlearnAtkError

# format -> how to recognize it, for people (the error for an unknown file lists these)
FORMATS = {
    "diffusers pipeline directory": "a folder with model_index.json (save_pretrained), or a hub id",
    "UNet / text-encoder weights": "diffusers keys (conv_in.*, down_blocks.* / embeddings.token_embedding.*), "
                                   "optionally prefixed unet., text_encoder., model.",
    "original UNet": "model.diffusion_model.* keys only (CompVis layout)",
    "original single-file checkpoint": "model.diffusion_model.* with first_stage_model.* (VAE) and/or "
                                       "cond_stage_model.* (text encoder): SD / ESD / FMN releases",
    "LoRA, diffusers layout": "unet./text_encoder. keys ending .lora_A/.lora_B, .lora.down/.lora.up or "
                              ".lora_linear_layer.down/.up",
    "LoRA, PEFT layout": "keys ending .lora_A.weight/.lora_B.weight without a component prefix, or under "
                         "base_model.model. (adapter_config.json beside the file gives lora_alpha)",
    "LoRA, kohya layout": "lora_unet_*/lora_te_* keys ending .lora_down.weight/.lora_up.weight/.alpha",
}

LDM_UNET_PREFIX = "model.diffusion_model."
# module names only a diffusers UNet / a CLIP text encoder has (a whole-component file)
COMPONENT_MARKERS = {
    "unet": ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.", "up_blocks.", "conv_norm_out."),
    "text_encoder": ("embeddings.token_embedding.", "embeddings.position_embedding.", "encoder.layers.",
                     "final_layer_norm."),
}
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_PREFIXES = ("cond_stage_model.transformer.", "cond_stage_model.model.")
KEYS_SHOWN = 8

# (down/A suffix, up/B suffix) of every LoRA layout we read
LORA_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    ("_lora.down.weight", "_lora.up.weight"),
    (".lora_down.weight", ".lora_up.weight"),
)
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
PEFT_PREFIX = "base_model.model."
_PEFT_ADAPTER_NAME = re.compile(r"\.lora_([AB])\.[^.]+\.weight$")  # lora_A.<adapter>.weight -> lora_A.weight


def normalize_lora_key(key: str) -> str:
    """PEFT keys that name their adapter (``.lora_A.default.weight``) as the plain form."""
    return _PEFT_ADAPTER_NAME.sub(r".lora_\1.weight", key)


def lora_split(key: str) -> tuple[str, str] | None:
    """``(module name, "down" | "up")`` of a LoRA weight key, else None."""
    key = normalize_lora_key(key)
    for down, up in LORA_SUFFIXES:
        if key.endswith(down):
            return key[: -len(down)], "down"
        if key.endswith(up):
            return key[: -len(up)], "up"
    return None


def lora_component(module: str, layout: str) -> str:
    """Which pipeline component a LoRA module (as named in the file) belongs to."""
    if layout == "kohya":
        return next(c for p, c in KOHYA_PREFIXES.items() if module.startswith(p))
    for component in ("unet", "text_encoder"):
        if module.startswith(component + "."):
            return component
    bare = module.removeprefix(PEFT_PREFIX)
    return "text_encoder" if bare.startswith(("text_model.", "encoder.layers.")) else "unet"


@dataclass(frozen=True)
class DetectedFormat:
    """What a weights file holds, told from its keys. ``describe`` is the report's line about it."""

    kind: str  # "component" | "original_unet" | "checkpoint" | "lora"
    layout: str  # "diffusers" | "peft" | "kohya" | "original"
    components: tuple[str, ...] = ()  # the pipeline components the file carries
    lora_modules: dict[str, int] = field(default_factory=dict)  # LoRA: adapted modules per component
    ranks: tuple[int, ...] = ()  # LoRA: the distinct ranks, smallest first

    @property
    def is_lora(self) -> bool:
        return self.kind == "lora"

    def describe(self, *, base: str | None = None, scale: float | None = None, config: str | None = None) -> str:
        """One line for people: ``LoRA rank 4 on unet (192 modules), kohya layout, over sd14, scale 1.0``."""
        over = f" over {base}" if base else ""
        if self.kind == "lora":
            over += "," if over else ""
            low, high = (self.ranks[0], self.ranks[-1]) if self.ranks else (0, 0)
            rank = f"{low}-{high}" if low != high else str(low)
            on = " and ".join(f"{name} ({count} modules)" for name, count in self.lora_modules.items())
            return f"LoRA rank {rank} on {on}, {self.layout} layout,{over} scale {float(1.0 if scale is None else scale)}"
        if self.kind == "checkpoint":
            configs = f", configs from {config}" if config else ""
            return f"original single-file checkpoint ({', '.join(self.components)}){configs}"
        if self.kind == "original_unet":
            return f"original-layout UNet weights (converted){over}"
        return f"{' + '.join(self.components)} weights, diffusers layout{over}"


def detect(shapes: Mapping[str, tuple[int, ...]], path: str | Path) -> DetectedFormat:
    """The format of a weights file from its ``{key: shape}``; an unknown one raises, listing what we read."""
    keys = list(shapes)
    if any(k.startswith(LDM_UNET_PREFIX) for k in keys):
        others = [name for name, prefixes in (("vae", (LDM_VAE_PREFIX,)), ("text_encoder", LDM_TEXT_PREFIXES))
                  if any(k.startswith(prefixes) for k in keys)]
        if others:
            return DetectedFormat("checkpoint", "original", ("unet", *others))
        return DetectedFormat("original_unet", "original", ("unet",))
    lora = _detect_lora(shapes)
    if lora is not None:
        return lora
    counts = {name: sum(any(marker in k for marker in markers) for k in keys) for name, markers in COMPONENT_MARKERS.items()}
    best = max(counts, key=counts.get)
    if counts[best]:
        return DetectedFormat("component", "diffusers", (best,))
    raise unrecognized(path, keys)


def unrecognized(path: str | Path, keys: list[str]) -> UnlearnAtkError:
    """The error for a file in none of :data:`FORMATS`: what we read, and what the file holds."""
    formats = "\n".join(f"  - {name}: {how}" for name, how in FORMATS.items())
    return UnlearnAtkError(
        f"{path}: not a format we read. Its {len(keys)} keys begin with {keys[:KEYS_SHOWN]}. "
        f"The formats we read are:\n{formats}"
    )


def _detect_lora(shapes: Mapping[str, tuple[int, ...]]) -> DetectedFormat | None:
    keys = list(shapes)
    if keys and all(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys):
        layout = "kohya"
    elif any(lora_split(k) for k in keys):
        prefixed = all(k.startswith(("unet.", "text_encoder.")) for k in keys)
        peft_style = all(".lora_A." in k or ".lora_B." in k for k in keys if lora_split(k))
        layout = "peft" if peft_style and not prefixed else "diffusers"
    else:
        return None
    modules: dict[str, set[str]] = {}
    ranks = set()
    for key, shape in shapes.items():
        split = lora_split(key)
        if split is None:
            continue
        module, which = split
        component = lora_component(module, layout)
        modules.setdefault(component, set()).add(module)
        if which == "down" and shape:
            ranks.add(int(shape[0]))
    order = [c for c in ("unet", "text_encoder") if c in modules]
    return DetectedFormat("lora", layout, tuple(order), {c: len(modules[c]) for c in order}, tuple(sorted(ranks)))


def key_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a weights file without reading its tensors where the format allows
    (safetensors headers; torch files memory-mapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except Exception:
            pass  # a damaged file: read_state_dict says what is wrong with it
    from .models import read_state_dict

    return shapes_of(read_state_dict(path, mmap=True))


def shapes_of(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}
