"""A tiny but complete Stable Diffusion pipeline for tests and demos, built from configs.

Random weights, the real CLIP tokenizer (49408 tokens, shipped with the package), 8x8x4 latents
and 32x32 images. It is saved with ``save_pretrained`` so tests load it back through
``load_pipeline`` exactly as a user's model would be. It draws noise, not concepts: use it to
exercise code paths, never to judge whether an attack "works" (the toy world is for that).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .tokens import clip_tokenizer

TINY_TEXT_WIDTH = 32


def assemble_pipeline(unet: Any, vae: Any, text_encoder: Any, prediction_type: str = "epsilon") -> Any:
    """A StableDiffusionPipeline of these modules, the real CLIP tokenizer and SD v1's noise schedule."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, steps_offset=1, prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_tiny_pipeline(out_dir: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny StableDiffusionPipeline to ``out_dir`` (about 8 MB) and return the directory."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=TINY_TEXT_WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    pipeline = assemble_pipeline(unet, vae, text_encoder, prediction_type)
    out_dir = Path(out_dir)
    pipeline.save_pretrained(out_dir)
    return out_dir


# Stable Diffusion v1.x shapes (CompVis/stable-diffusion-v1-4): UNet channels, VAE channels.
SD_SHAPES = {
    "sd14": {"unet": (320, 640, 1280, 1280), "vae": (128, 256, 512, 512)},
    "medium": {"unet": (160, 320, 640, 640), "vae": (64, 128, 256, 256)},  # half the channels
}


def sd_shaped_model(shape: str = "sd14", resolution: int = 512, device: str = "cpu", dtype: str = "float32",
                    seed: int = 0) -> Any:
    """A random-weight pipeline with Stable Diffusion v1's layout and a CLIP ViT-L/14 text tower,
    built in memory on ``device`` (no download), as a ``LoadedModel``. For benchmarks.

    ``shape``: ``sd14`` (SD v1.4's sizes: 860M-parameter UNet) or ``medium`` (half the channels).
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .models import LoadedModel

    sizes = SD_SHAPES[shape]
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=resolution // 8, block_out_channels=sizes["unet"], layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
        vae = AutoencoderKL(
            block_out_channels=sizes["vae"], layers_per_block=2, latent_channels=4, sample_size=resolution,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ))
    pipeline = assemble_pipeline(unet, vae, text_encoder)
    if dtype != "float32":
        pipeline.to(dtype=getattr(torch, dtype))
    pipeline.set_progress_bar_config(disable=True)
    return LoadedModel(pipeline=pipeline, source=f"random:{shape}@{resolution}px", fingerprint=f"random-{shape}-{resolution}-{seed}",
                       device=device, dtype=dtype)


def build_tiny_sd2_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny pipeline shaped like Stable Diffusion 2.x (768-v): v-prediction, a wider OpenCLIP-style
    text encoder (gelu, 2 heads of different width), per-block attention head widths, linear
    transformer projections and upcast attention; 16x16 latents (128 px images). Saved like
    :func:`build_tiny_pipeline`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48, attention_head_dim=(4, 8), use_linear_projection=True, upcast_attention=True,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 32, 32), latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        sample_size=128,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=48, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    ))
    pipeline = assemble_pipeline(unet, vae, text_encoder, "v_prediction")
    out_dir = Path(out_dir)
    pipeline.save_pretrained(out_dir)
    return out_dir


# --- original (CompVis / Stability) layout: our own inverse of diffusers' single-file conversion ---
# Used by tests to write the single-file checkpoints ESD / FMN / the SD releases ship.

_RESNET_TO_ORIGINAL = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                       ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))


def original_unet_state(state: dict[str, Any], config: Any) -> dict[str, Any]:
    """A diffusers UNet state dict in the original ``model.diffusion_model.*`` layout (SD 1.x / 2.x shapes)."""
    per_block = config["layers_per_block"]
    n_blocks = len(config["down_block_types"])
    with_attention = {i for i, kind in enumerate(config["down_block_types"]) if kind.startswith("CrossAttn")}

    def resnet(rest: str) -> str:
        for new, old in _RESNET_TO_ORIGINAL:
            if rest.startswith(new + "."):
                return old + rest[len(new):]
        raise ValueError(f"unmapped resnet key {rest}")

    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("conv_in."):
            name = "input_blocks.0.0." + parts[1]
        elif key.startswith("time_embedding.linear_"):
            name = f"time_embed.{(int(parts[1][-1]) - 1) * 2}.{parts[2]}"
        elif key.startswith("conv_norm_out."):
            name = "out.0." + parts[1]
        elif key.startswith("conv_out."):
            name = "out.2." + parts[1]
        elif key.startswith("down_blocks."):
            block, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                name = f"input_blocks.{(block + 1) * (per_block + 1)}.0.op." + parts[-1]
            else:
                layer, rest = 1 + block * (per_block + 1) + int(parts[3]), ".".join(parts[4:])
                name = f"input_blocks.{layer}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{layer}.1.{rest}"
        elif key.startswith("mid_block."):
            kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            name = f"middle_block.{2 * index}.{resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif key.startswith("up_blocks."):
            block, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                slot = 2 if (n_blocks - 1 - block) in with_attention else 1
                name = f"output_blocks.{block * (per_block + 1) + per_block}.{slot}.conv." + parts[-1]
            else:
                layer, rest = block * (per_block + 1) + int(parts[3]), ".".join(parts[4:])
                name = f"output_blocks.{layer}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{layer}.1.{rest}"
        else:
            raise ValueError(f"unmapped UNet key {key}")
        out["model.diffusion_model." + name] = value
    return out


def original_vae_state(state: dict[str, Any], config: Any) -> dict[str, Any]:
    """A diffusers AutoencoderKL state dict in the original ``first_stage_model.*`` layout."""
    n_up = len(config["up_block_types"])
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        name = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
        name = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                      lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.", name)
        name = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                      lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.", name)
        name = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
        if ".mid_block.attentions.0." in name:
            head, rest = name.split(".mid_block.attentions.0.")
            module, _, leaf = rest.rpartition(".")
            name = f"{head}.mid.attn_1.{attention[module]}.{leaf}"
            if module != "group_norm" and value.ndim == 2:
                value = value[:, :, None, None]  # the original attention uses 1x1 convolutions
        out["first_stage_model." + name] = value
    return out


def original_text_encoder_state(state: dict[str, Any], open_clip: bool = False, extra_layer: bool = False) -> dict:
    """A CLIPTextModel state dict as SD 1.x (``cond_stage_model.transformer.text_model.*``) or, with
    ``open_clip``, SD 2.x (``cond_stage_model.model.*``, OpenCLIP names, fused q/k/v) stores it.
    ``extra_layer``: add one more (random) layer, as SD 2 files hold the last layer diffusers leaves out."""
    import torch

    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    if not open_clip:
        return {"cond_stage_model.transformer.text_model." + k: v for k, v in state.items()}
    out = {}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for key, value in state.items():
        if key.startswith("encoder.layers."):
            continue
        name = {"embeddings.token_embedding.weight": "token_embedding.weight",
                "embeddings.position_embedding.weight": "positional_embedding",
                "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}[key]
        out[name] = value
    for index in layers + ([layers[-1] + 1] if extra_layer else []):
        source = f"encoder.layers.{min(index, layers[-1])}."

        def get(name: str) -> Any:
            tensor = state[source + name]
            return torch.randn_like(tensor) if index > layers[-1] else tensor

        target = f"transformer.resblocks.{index}."
        for kind in ("weight", "bias"):
            out[target + f"attn.in_proj_{kind}"] = torch.cat([get(f"self_attn.{p}_proj.{kind}") for p in "qkv"])
            out[target + f"attn.out_proj.{kind}"] = get(f"self_attn.out_proj.{kind}")
            out[target + f"ln_1.{kind}"] = get(f"layer_norm1.{kind}")
            out[target + f"ln_2.{kind}"] = get(f"layer_norm2.{kind}")
            out[target + f"mlp.c_fc.{kind}"] = get(f"mlp.fc1.{kind}")
            out[target + f"mlp.c_proj.{kind}"] = get(f"mlp.fc2.{kind}")
    width = state["final_layer_norm.weight"].shape[0]
    out["text_projection"] = torch.eye(width)  # OpenCLIP's projection: unused by SD, present in its files
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def original_checkpoint(pipeline: Any, parts: tuple[str, ...] = ("unet", "vae", "text_encoder")) -> dict[str, Any]:
    """A pipeline's weights as one original-layout single-file checkpoint (SD 2 shapes get OpenCLIP names
    and an extra last text layer, as Stability's files have)."""
    open_clip = pipeline.text_encoder.config.hidden_act == "gelu"
    out: dict[str, Any] = {}
    if "unet" in parts:
        out.update(original_unet_state(pipeline.unet.state_dict(), pipeline.unet.config))
    if "vae" in parts:
        out.update(original_vae_state(pipeline.vae.state_dict(), pipeline.vae.config))
    if "text_encoder" in parts:
        out.update(original_text_encoder_state(pipeline.text_encoder.state_dict(), open_clip, extra_layer=open_clip))
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


class DiffersFromPlain:
    """A judge for tests, made fresh for each gate of one case: a hit is any image that differs
    from the first image it saw (the case's plain image), so any candidate that changes the
    picture counts as a hit."""

    name = "differs_from_plain"
    settings: dict = {}

    def __init__(self) -> None:
        self.first: Any = None

    def __call__(self, images: list[Any]) -> list[dict[str, Any]]:
        import numpy as np

        pixels = [np.asarray(image) for image in images]
        if self.first is None:
            self.first = pixels[0]
        return [{"hit": not np.array_equal(p, self.first), "score": 1.0} for p in pixels]
