"""A tiny but complete Stable Diffusion pipeline for tests and demos, built from configs.

Random weights, the real CLIP tokenizer (49408 tokens, shipped with the package), 8x8x4 latents
and 32x32 images. It is saved with ``save_pretrained`` so tests load it back through
``load_pipeline`` exactly as a user's model would be. It draws noise, not concepts: use it to
exercise code paths, never to judge whether an attack "works" (the toy world is for that).
"""

from __future__ import annotations

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
