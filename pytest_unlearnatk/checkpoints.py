"""Original (CompVis / Stability) single-file checkpoints: UNet, VAE and text encoder in one file.

ESD, FMN and the Stable Diffusion releases themselves ship such files. We read them the way
diffusers' single-file loading does (its LDM-to-diffusers key converters), but offline and
strictly: the components are built from the configs of a local diffusers pipeline directory (the
base, or the folder the file sits in), every converted key must fit, and the tokenizer and
scheduler come from that directory too. Nothing is fetched from the hub, ever.

A component the file does not hold (a checkpoint with UNet and VAE only) is loaded from the
config directory's own weights; the report line names which came from where.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

from .errors import UnlearnAtkError
from .formats import LDM_VAE_PREFIX, DetectedFormat

OPEN_CLIP_PREFIX = "cond_stage_model.model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
# constant buffers and parts CLIPTextModel has no place for (OpenCLIP's projection and logit scale)
_UNUSED_TEXT_KEYS = ("text_projection.weight", "logit_scale", "attn_mask", "embeddings.position_ids")


def config_directory(path: Path, base: str | None) -> Path:
    """The local diffusers pipeline directory whose configs read the checkpoint ``path``: the base when
    it is one, else the folder holding the file; never a download."""
    candidates = ([Path(base).expanduser()] if base is not None else []) + [path.parent]
    for candidate in candidates:
        if (candidate / "model_index.json").is_file():
            return candidate
    raise UnlearnAtkError(
        f"{path} is an original single-file checkpoint; reading it needs the configs of a local diffusers pipeline "
        "of the same architecture (we never download them): pass --unlearn-base=DIR (base= in Python), a pipeline "
        "directory such as the model it was fine-tuned from, or put the file in such a directory"
        + (f" ({base} has no model_index.json)" if base is not None else "")
    )


def load_checkpoint(path: Path, state: dict[str, Any], found: DetectedFormat, config_dir: Path, dtype: str) -> Any:
    """A StableDiffusionPipeline (on the CPU) with the file's components, the rest from ``config_dir``."""
    import torch

    from .models import _check_keys, _from_pretrained, _quiet_libraries

    with _quiet_libraries():
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

    components: dict[str, Any] = {}
    for name in found.components:
        folder = config_dir / name
        with _quiet_libraries(), _empty_weights():
            if name == "unet":
                module = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
            elif name == "vae":
                module = AutoencoderKL.from_config(AutoencoderKL.load_config(folder))
            else:
                module = CLIPTextModel(CLIPTextConfig.from_pretrained(folder))
        weights = _convert(name, state, module, path)
        _check_keys(weights, module.state_dict(), name, path, config_dir)
        # the file's dtype (often float16) becomes the run's; assign: the empty weights are replaced
        module.load_state_dict({k: v.to(getattr(torch, dtype)) for k, v in weights.items()}, strict=True, assign=True)
        components[name] = module
    return _from_pretrained(config_dir, dtype, **components)


@contextlib.contextmanager
def _empty_weights() -> Any:
    """Build modules without allocating their weights (they are all about to be replaced)."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        yield
        return
    with init_empty_weights(include_buffers=False):
        yield


def _convert(name: str, state: dict[str, Any], module: Any, path: Path) -> dict[str, Any]:
    """The component's weights, renamed from the original layout to diffusers'."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from .models import _convert_ldm_unet

    if name == "unet":  # also checks that the file holds no unknown groups of keys
        return _convert_ldm_unet(state, module.config, path)
    try:
        if name == "vae":
            return convert_ldm_vae_checkpoint({k: v for k, v in state.items() if k.startswith(LDM_VAE_PREFIX)},
                                              dict(module.config))
        return _convert_text_encoder(state, module)
    except (KeyError, IndexError, ValueError, RuntimeError) as exc:
        raise UnlearnAtkError(
            f"{path}: its original-layout {name} does not fit the config directory's {name} config "
            f"({type(exc).__name__}: {str(exc)[:200]}); is that directory the same architecture (SD 1.x vs 2.x)?"
        ) from exc


def _convert_text_encoder(state: dict[str, Any], module: Any) -> dict[str, Any]:
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in state):
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

        # SD 2.x conditions on OpenCLIP's penultimate layer: diffusers' config stops one layer early,
        # so the file's layers past the config's count are not part of the text encoder we build
        layers = module.config.num_hidden_layers
        kept = {k: v for k, v in state.items()
                if k.startswith(OPEN_CLIP_PREFIX) and not _layer_at_least(k, layers)}
        weights = convert_open_clip_checkpoint(module, kept, prefix=OPEN_CLIP_PREFIX)
    else:
        weights = {k[len(SD1_CLIP_PREFIX):]: v for k, v in state.items() if k.startswith(SD1_CLIP_PREFIX)}
    own = module.state_dict()
    weights = {(k if k in own else k.removeprefix("text_model.")): v for k, v in weights.items()}
    return {k: v for k, v in weights.items() if not (k.endswith(_UNUSED_TEXT_KEYS) and k not in own)}


def _layer_at_least(key: str, layers: int) -> bool:
    match = re.search(r"\.resblocks\.(\d+)\.", key)
    return match is not None and int(match[1]) >= layers

