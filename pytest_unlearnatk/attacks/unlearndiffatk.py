"""UnlearnDiffAtk (Zhang et al., ECCV 2024): the unlearned model as its own classifier.

Find the k prompt tokens under which the unlearned model itself best "explains" a target image
that shows the concept, i.e. that minimize its denoising loss on that image:

1. Each adversarial position holds a probability vector over the whole vocabulary, uniform at
   first. A step samples one token per position, embeds its one-hot (straight-through: the
   gradient on the one-hot, clipped to [-1, 1], is the gradient on the probabilities), runs the
   text encoder and the UNet on the noised target latent, and takes an Adam step on the MSE
   between the predicted and the true noise. The rows are then projected back onto the
   probability simplex.
2. Timesteps are swept in order (10, 30, ..., 990 at the reference budget), a block of steps each.
3. After each block the argmax tokens form a candidate; it is rendered with the unlearned model
   at the case's seed and guidance and judged. The first hit ends the case.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..cases import Case
from ..errors import UnlearnAtkError
from ..render import noise_schedule
from ..results import CandidateCheck
from ..tokens import FittedPrompt
from .base import AttackContext, AttackOutcome


@dataclass(frozen=True)
class UnlearnDiffAtkConfig:
    """Every knob of the attack. The defaults are the paper's (the ``reference`` preset)."""

    n_tokens: int = 5  # adversarial tokens, prepended to the prompt (5 for nudity, 3 for objects/styles)
    lr: float = 0.01  # Adam learning rate on the token probabilities
    weight_decay: float = 0.1  # Adam weight decay
    num_timesteps: int = 50  # timesteps swept: T/n/2, T/n/2 + T/n, ... (10, 30, ..., 990 for T=1000)
    steps_per_timestep: int = 40  # Adam steps at each timestep; a candidate is checked after each block
    grad_clip: float = 1.0  # straight-through gradient clipped to [-grad_clip, grad_clip]
    seed: int = 0  # mixed with the case's seed for token sampling and noise

    def __post_init__(self) -> None:
        for name in ("n_tokens", "num_timesteps", "steps_per_timestep"):
            if getattr(self, name) < 1:
                raise UnlearnAtkError(f"UnlearnDiffAtk {name}={getattr(self, name)}; must be at least 1")
        if self.lr <= 0:
            raise UnlearnAtkError(f"UnlearnDiffAtk lr={self.lr}; must be positive")

    @property
    def max_steps(self) -> int:
        return self.num_timesteps * self.steps_per_timestep

    def timesteps(self, num_train_timesteps: int) -> list[int]:
        """The swept timesteps, in the order they are visited."""
        stride = num_train_timesteps // self.num_timesteps
        if stride < 1:
            raise UnlearnAtkError(f"num_timesteps={self.num_timesteps} exceeds the model's {num_train_timesteps} timesteps")
        return list(range(stride // 2, num_train_timesteps, stride))[: self.num_timesteps]


PRESETS: dict[str, UnlearnDiffAtkConfig] = {
    # The paper's settings, unchanged: 50 timesteps x 40 steps, at most 2000 steps and 51 renders.
    "reference": UnlearnDiffAtkConfig(),
    # A tenth of the optimization: 10 timesteps x 20 steps, at most 11 renders per case.
    "fast": UnlearnDiffAtkConfig(num_timesteps=10, steps_per_timestep=20),
    # Just enough to run every code path: 2 timesteps x 3 steps. For tests.
    "smoke": UnlearnDiffAtkConfig(num_timesteps=2, steps_per_timestep=3),
}


def get_preset(name: str, **overrides: Any) -> UnlearnDiffAtkConfig:
    """A named preset (``reference``, ``fast``, ``smoke``), with fields overridden by keyword."""
    if name not in PRESETS:
        raise UnlearnAtkError(f"unknown budget preset {name!r}; use one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(UnlearnDiffAtkConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UnlearnAtkError(f"unknown UnlearnDiffAtk setting(s) {unknown}; known: {sorted(known)}")
    return replace(PRESETS[name], **overrides)


def project_to_simplex(rows: Any, iterations: int = 40) -> Any:
    """Euclidean projection of each row onto {p : 0 <= p <= 1, sum p = 1}, by bisection on the shift.

    Finds mu with sum(clip(row - mu, 0, 1)) = 1 for all rows at once; a fixed number of halvings
    (40 halve the initial bracket below 1e-11) keeps it free of host synchronisation.
    """
    import torch

    low = rows.min(dim=-1, keepdim=True).values - 1.0  # sum(clip(row - low)) >= 1
    high = rows.max(dim=-1, keepdim=True).values  # sum(clip(row - high)) = 0
    for _ in range(iterations):
        mid = (low + high) / 2
        too_much = (rows - mid).clamp(0, 1).sum(dim=-1, keepdim=True) > 1
        low = torch.where(too_much, mid, low)
        high = torch.where(too_much, high, mid)
    return (rows - (low + high) / 2).clamp(0, 1)


class EmbeddingInjector:
    """Replaces the token embeddings at given positions, by a forward hook on the input embedding.

    The hook on ``get_input_embeddings()`` works on every transformers version; passing embeddings
    through ``forward`` arguments does not (transformers 5's CLIPTextModel takes only ids).
    """

    def __init__(self, text_encoder: Any, positions: list[int]) -> None:
        self.module = text_encoder.get_input_embeddings()
        self.positions = positions
        self.embeddings: Any = None  # (n_positions, width); None = leave the embeddings alone

    def _hook(self, module: Any, args: Any, output: Any) -> Any:
        if self.embeddings is None:
            return output
        output = output.clone()
        output[:, self.positions] = self.embeddings.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
        return output

    @contextlib.contextmanager
    def active(self) -> Iterator[EmbeddingInjector]:
        handle = self.module.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()
            self.embeddings = None


class UnlearnDiffAtk:
    name = "unlearndiffatk"
    needs_target = True

    def __init__(self, config: UnlearnDiffAtkConfig | None = None) -> None:
        self.config = config or PRESETS["reference"]

    @property
    def n_adversarial(self) -> int:
        return self.config.n_tokens

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    def run(self, case: Case, prompt: FittedPrompt, context: AttackContext) -> AttackOutcome:
        import torch

        if context.target is None:
            raise UnlearnAtkError(
                "UnlearnDiffAtk needs target images: give a base model (base=, --unlearn-base) or a target directory"
            )
        config, layout, pipeline = self.config, context.layout, context.model.pipeline
        device = pipeline.device
        plain_ids = layout.sequence(prompt.content_ids)
        target_latent = encode_target(pipeline, context.target(case, plain_ids))
        generator = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + case.seed)

        text_encoder, unet = pipeline.text_encoder, pipeline.unet
        for module in (text_encoder, unet, pipeline.vae):
            module.requires_grad_(False).eval()
        token_embeddings = text_encoder.get_input_embeddings().weight  # (vocab, width)
        vocab = token_embeddings.shape[0]
        k = config.n_tokens
        positions = list(range(1, 1 + k))
        ids = torch.tensor([layout.sequence(prompt.content_ids, [layout.pad_id] * k)], device=device)

        alphas_cumprod = noise_schedule(pipeline).to(device=device, dtype=torch.float32)
        v_prediction = pipeline.scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
        probabilities = torch.full((k, vocab), 1.0 / vocab, device=device, dtype=torch.float32, requires_grad=True)
        optimizer = torch.optim.Adam([probabilities], lr=config.lr, weight_decay=config.weight_decay)

        outcome = AttackOutcome()
        last_checked: list[int] | None = None
        start = time.perf_counter()
        render_seconds_before = context.check.render_seconds + context.check.judge_seconds
        with EmbeddingInjector(text_encoder, positions).active() as injector:
            for t in config.timesteps(len(alphas_cumprod)):
                signal, noise_scale = alphas_cumprod[t].sqrt(), (1 - alphas_cumprod[t]).sqrt()
                timestep = torch.tensor([t], device=device)
                block_losses = []
                for _ in range(config.steps_per_timestep):
                    optimizer.zero_grad(set_to_none=True)
                    sampled = torch.multinomial(probabilities.detach(), 1, generator=generator).squeeze(1)
                    one_hot = torch.nn.functional.one_hot(sampled, vocab).to(probabilities.dtype)
                    # straight-through: the forward pass sees the one-hot, the gradient reaches the probabilities
                    one_hot = one_hot + probabilities - probabilities.detach()
                    injector.embeddings = one_hot.to(token_embeddings.dtype) @ token_embeddings
                    hidden = text_encoder(ids)[0]
                    noise = torch.randn(target_latent.shape, generator=generator, device=device, dtype=torch.float32)
                    noisy = (signal * target_latent + noise_scale * noise).to(unet.dtype)
                    prediction = unet(noisy, timestep, encoder_hidden_states=hidden).sample.float()
                    wanted = signal * noise - noise_scale * target_latent if v_prediction else noise
                    loss = torch.nn.functional.mse_loss(prediction, wanted)
                    loss.backward()
                    probabilities.grad.clamp_(-config.grad_clip, config.grad_clip)
                    optimizer.step()
                    with torch.no_grad():
                        probabilities.copy_(project_to_simplex(probabilities))
                    block_losses.append(loss.detach())
                injector.embeddings = None
                outcome.steps += len(block_losses)
                outcome.loss_trace.extend(torch.stack(block_losses).tolist())

                candidate = probabilities.detach().argmax(dim=-1).tolist()
                if candidate == last_checked:  # same tokens, same image: it was a miss already
                    outcome.checks.append(CandidateCheck(outcome.steps, t, candidate, rendered=False, hit=False, score=outcome.checks[-1].score))
                    continue
                last_checked = candidate
                verdict, image = context.check(layout.sequence(prompt.content_ids, candidate))
                outcome.checks.append(CandidateCheck(outcome.steps, t, candidate, rendered=True, hit=verdict.hit, score=verdict.score))
                outcome.adversarial_ids, outcome.verdict, outcome.image = candidate, verdict, image
                if verdict.hit:
                    outcome.hit, outcome.hit_step, outcome.hit_timestep = True, outcome.steps, t
                    break
        checking = context.check.render_seconds + context.check.judge_seconds - render_seconds_before
        outcome.optimize_seconds = time.perf_counter() - start - checking
        return outcome


def encode_target(pipeline: Any, image: Any) -> Any:
    """The VAE's mean latent of ``image`` (resized to the model's size), times the VAE scaling factor."""
    import torch

    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    pixels = pipeline.image_processor.preprocess(image, height=size, width=size)
    with torch.no_grad():
        latent = pipeline.vae.encode(pixels.to(pipeline.device, pipeline.vae.dtype)).latent_dist.mean
    return latent.float() * pipeline.vae.config.scaling_factor


def denoising_loss(pipeline: Any, ids: list[int], target_latent: Any, timestep: int, noises: Any) -> float:
    """The attack's objective for one id sequence, averaged over given noise samples at one timestep.

    With fixed ``noises`` it compares prompts fairly (the per-step loss of the attack uses a fresh
    noise sample each step). Diagnostics and tests use it; the attack itself does not.
    """
    import torch

    alphas = noise_schedule(pipeline).to(target_latent.device)
    noises = noises.to(target_latent.device)
    v_prediction = pipeline.scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
    with torch.no_grad():
        hidden = pipeline.text_encoder(torch.tensor([ids], device=target_latent.device))[0]
        signal, noise_scale = alphas[timestep].sqrt(), (1 - alphas[timestep]).sqrt()
        noisy = (signal * target_latent + noise_scale * noises).to(pipeline.unet.dtype)
        prediction = pipeline.unet(noisy, torch.tensor([timestep], device=noisy.device),
                                   encoder_hidden_states=hidden.expand(len(noises), -1, -1)).sample.float()
        wanted = signal * noises - noise_scale * target_latent if v_prediction else noises
        return torch.nn.functional.mse_loss(prediction, wanted).item()
