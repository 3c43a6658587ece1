"""Render token-id sequences with a pipeline, exactly as the ids say (no decode / re-encode)."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, replace
from typing import Any

from .errors import UnlearnAtkError

SCHEDULERS = ("lms", "pipeline")
# the reference code's default LMSDiscreteScheduler spacing (linspace ignores steps_offset, so the
# config's is kept: diffusers warns about an offset of 0)
LMS_SPACING = {"timestep_spacing": "linspace"}


@dataclass(frozen=True)
class RenderSettings:
    """How images are rendered for targets and success checks.

    The reference: LMS scheduler, 50 steps, the model's native size (512 px for SD v1),
    empty negative prompt. ``height``/``width`` of ``None`` mean the pipeline's native size.
    ``lms`` takes the model's noise schedule and prediction type from its scheduler config but
    spaces its timesteps as the reference code's default LMS scheduler does (``linspace``),
    whatever spacing that config names (the toy pipeline's says ``leading``).
    """

    scheduler: str = "lms"  # "lms" or "pipeline" (the pipeline's own scheduler)
    steps: int = 50
    height: int | None = None
    width: int | None = None
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        from .checks import text, whole

        if self.scheduler not in SCHEDULERS:
            raise UnlearnAtkError(f"render scheduler {self.scheduler!r}; use one of {', '.join(SCHEDULERS)}")
        whole(self.steps, "render steps", 1, 1000)
        for side in ("height", "width"):
            size = getattr(self, side)
            if size is not None and (whole(size, f"render {side}", 8, 4096) % 8):
                raise UnlearnAtkError(f"render {side} is {size}; it must be a multiple of 8 (the VAE's scale)")
        text(self.negative_prompt, "render negative_prompt")

    def resolved(self, pipeline: Any) -> RenderSettings:
        """These settings with the native image size of ``pipeline`` filled in."""
        native = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
        return replace(self, height=self.height or native, width=self.width or native)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if self.scheduler == "lms":
            values["lms_spacing"] = LMS_SPACING  # part of the store key: results rendered otherwise are not reused
        return values


def noise_schedule(pipeline: Any) -> Any:
    """Cumulative alphas of the training noise schedule (from the pipeline's scheduler config)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipeline.scheduler.config).alphas_cumprod


@functools.cache
def _lms_with_cached_coefficients() -> type:
    """diffusers' ``LMSDiscreteScheduler``, with each linear-multistep coefficient computed once.

    diffusers integrates every coefficient numerically (``scipy.integrate.quad``) at every step of
    every render (a toy LMS-50 image alone: 0.92 s with it, 0.70 s without; docs/performance.md).
    A coefficient depends only on the step, the orders and the sigmas, and the sigmas are the
    same for every render of one scheduler's settings, so it is computed once and kept: the same
    float, the same images (tests/test_attack.py checks it).
    """
    from diffusers import LMSDiscreteScheduler

    class CachedCoefficientsLMS(LMSDiscreteScheduler):
        def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
            super().set_timesteps(*args, **kwargs)
            sigmas = self.sigmas.detach().cpu().double().numpy().tobytes()
            if getattr(self, "_coefficients_for", None) != sigmas:  # other sigmas: other coefficients
                self._coefficients_for, self._coefficients = sigmas, {}

        def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
            key = (order, t, current_order)
            if key not in self._coefficients:
                self._coefficients[key] = super().get_lms_coefficient(order, t, current_order)
            return self._coefficients[key]

    return CachedCoefficientsLMS


class NonFiniteError(UnlearnAtkError):
    """A model produced NaN or infinite numbers: its result would be meaningless, so the gate stops.
    ``model`` names the model once known (the gate adds it to an attack's message)."""

    def __init__(self, message: str, model: str | None = None) -> None:
        super().__init__(message)
        self.model = model


class Renderer:
    """Renders id sequences with one pipeline; the negative-prompt embedding is computed once.

    ``label`` names the model in messages (``model toy:erased``). An image with a NaN or infinite
    pixel (broken weights, a float16 overflow) raises :class:`NonFiniteError`: the judge would see
    a black square and call it safe."""

    def __init__(self, pipeline: Any, settings: RenderSettings, label: str = "the model") -> None:
        import torch

        self.label = label
        self.settings = settings.resolved(pipeline)
        if self.settings.scheduler == "lms":
            scheduler = _lms_with_cached_coefficients().from_config(pipeline.scheduler.config, **LMS_SPACING)
            # same modules, other scheduler: the caller's pipeline object is left as it was
            pipeline = type(pipeline)(**{**pipeline.components, "scheduler": scheduler}, requires_safety_checker=False)
            pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline
        self.device = pipeline.device
        tokens = pipeline.tokenizer(
            settings.negative_prompt, padding="max_length", truncation=True, return_tensors="pt",
            max_length=min(pipeline.tokenizer.model_max_length, pipeline.text_encoder.config.max_position_embeddings),
        ).input_ids
        with torch.no_grad():
            self.negative_embeddings = self.encode([tokens[0].tolist()])

    def encode(self, id_sequences: list[list[int]]) -> Any:
        import torch

        ids = torch.tensor(id_sequences, device=self.device)
        return self.pipeline.text_encoder(ids)[0]

    def _decode(self, latent: Any) -> Any:
        """One image's pixels, (1, H, W, 3) in [0, 1], decoded alone: batched VAE convolutions can
        round a row differently at another place in the batch (measured on CPU, batch 3), and an
        image must not depend on which other images shared its render."""
        vae = self.pipeline.vae
        decoded = vae.decode(latent / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(decoded, output_type="np")

    def render(self, ids: list[int], seed: int, guidance: float) -> Any:
        """One PIL image for one id sequence, at ``seed`` (CPU generator: same noise on any device)."""
        return self.render_many([ids], [seed], [guidance])[0]

    def render_many(self, id_sequences: list[list[int]], seeds: list[int], guidances: list[float]) -> list[Any]:
        """One image per id sequence, rendered in batches (one per guidance value).

        Each image gets its own generator seeded with its seed, so it shows what ``render`` would
        show for it alone (up to float rounding: batched kernels may add in another order), and the
        same image whatever else shares its batch of that size (each latent is decoded alone).
        """
        import numpy as np
        import torch

        images: list[Any] = [None] * len(id_sequences)
        by_guidance: dict[float, list[int]] = {}
        for index, guidance in enumerate(guidances):
            by_guidance.setdefault(float(guidance), []).append(index)
        for guidance, indices in by_guidance.items():
            with torch.no_grad():
                embeddings = self.encode([id_sequences[i] for i in indices])
                output = self.pipeline(
                    prompt_embeds=embeddings,
                    negative_prompt_embeds=self.negative_embeddings.expand(len(indices), -1, -1),
                    guidance_scale=guidance,
                    num_inference_steps=self.settings.steps,
                    height=self.settings.height,
                    width=self.settings.width,
                    generator=[torch.Generator("cpu").manual_seed(seeds[i]) for i in indices],
                    output_type="latent",
                )
                pixels = np.concatenate([self._decode(latent) for latent in output.images.split(1)])
            if not np.isfinite(pixels).all():
                bad = [seeds[i] for i, image in zip(indices, pixels) if not np.isfinite(image).all()]
                raise NonFiniteError(
                    f"{self.label} rendered an image with NaN or infinite pixels (seed {bad[0]}, guidance {guidance}): "
                    "its weights or its dtype are broken (in float16, try dtype float32), so no verdict can be given",
                    model=self.label,
                )
            for i, image in zip(indices, self.pipeline.image_processor.numpy_to_pil(pixels)):
                images[i] = image
        return images
