"""P4D (Chin et al., ICML 2024, "Prompting4Debugging"): match the base model's noise prediction.

Soft prompt embeddings are optimized so that the unlearned model, conditioned on the adversarial
prompt, predicts the same noise as the base model conditioned on the case's original prompt, on
noised latents of the target image. Each step the soft embeddings are projected to their nearest
vocabulary tokens (cosine); the model runs on those tokens' embeddings, and the gradient on them
updates the soft embeddings (AdamW). The candidate checked every ``eval_step`` steps is the
projected tokens. Two variants:

- ``p4d-n``: ``prompt_len`` free tokens make up the whole adversarial prompt;
- ``p4d-k``: the original prompt's tokens stay, with a free token before every ``every_k`` of them.

The base model's prediction does not depend on the adversarial tokens, so it is computed without
a gradient, a block of ``eval_step`` steps at a time (their timesteps and noise are drawn first).
``offload_base``: the two UNets take turns on the device (the base's for a block's predictions,
then the unlearned one's for the block's steps), so the peak holds one UNet's weights, not two.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from ..cases import Case
from ..checks import finite, whole
from ..errors import UnlearnAtkError
from ..results import CandidateCheck
from ..tokens import FittedPrompt
from .base import AttackContext, AttackOutcome, CaseByCase, StepCallback
from .unlearndiffatk import MAX_ADVERSARIAL_TOKENS, EmbeddingInjector, encode_target


@dataclass(frozen=True)
class P4DSettings:
    """Settings both variants share; the defaults are the reference code's (``reference``)."""

    iterations: int = 3000  # optimization steps
    eval_step: int = 50  # a candidate is checked after every this many steps
    lr: float = 0.1  # AdamW learning rate on the soft embeddings
    weight_decay: float = 0.1
    offload_base: bool = False  # the UNets take turns on the device: peak memory of one UNet
    seed: int = 0  # mixed with the case's seed (initial tokens, timesteps, noise)

    def _check(self, name: str) -> None:
        whole(self.iterations, f"{name} iterations", 1, 1_000_000)
        whole(self.eval_step, f"{name} eval_step", 1, 1_000_000)
        whole(self.seed, f"{name} seed", 0, 2**31)
        if finite(self.lr, f"{name} lr", 0) == 0:
            raise UnlearnAtkError(f"{name} lr is 0; it must be positive")
        finite(self.weight_decay, f"{name} weight_decay", 0)
        if not isinstance(self.offload_base, bool):
            raise UnlearnAtkError(f"{name} offload_base is {self.offload_base!r}; it must be true or false")


@dataclass(frozen=True)
class P4DNConfig(P4DSettings):
    prompt_len: int = 16  # free tokens: the whole adversarial prompt

    def __post_init__(self) -> None:
        self._check("p4d-n")
        whole(self.prompt_len, "p4d-n prompt_len", 1, MAX_ADVERSARIAL_TOKENS)


@dataclass(frozen=True)
class P4DKConfig(P4DSettings):
    every_k: int = 3  # a free token before every k of the prompt's tokens

    def __post_init__(self) -> None:
        self._check("p4d-k")
        whole(self.every_k, "p4d-k every_k", 1, MAX_ADVERSARIAL_TOKENS)


def _presets(config_class: type) -> dict[str, Any]:
    return {
        "reference": config_class(),
        # a tenth of the steps, checked every 50 as in the reference (6 checks)
        "fast": config_class(iterations=300),
        # every code path, for tests: 6 steps, checked twice
        "smoke": config_class(iterations=6, eval_step=3),
    }


def interleave(content_ids: list[int], every_k: int, placeholder: int) -> tuple[list[int], list[int]]:
    """The prompt's ids with a placeholder before every ``every_k`` of them (the reference code's
    layout: free tokens at the indices divisible by k+1), and the indices of the placeholders."""
    free = len(content_ids) // every_k + 1
    content, slots, words = [], [], iter(content_ids)
    for index in range(len(content_ids) + free):
        if index % (every_k + 1) == 0:
            slots.append(index)
            content.append(placeholder)
        else:
            content.append(next(words))
    return content, slots


def _most_inserted(every_k: int) -> int:
    """Token slots the prompt must leave free: the most placeholders a prompt that fits can get."""
    longest = max(p for p in range(MAX_ADVERSARIAL_TOKENS + 1) if p + p // every_k + 1 <= MAX_ADVERSARIAL_TOKENS)
    return MAX_ADVERSARIAL_TOKENS - longest


class _P4D(CaseByCase):
    requires = ("torch", "diffusers", "transformers")
    needs_target = True  # noised latents of the target image
    needs_base = True  # the base UNet's prediction is what the attack matches
    default_preset = "reference"

    def __init__(self, config: Any = None) -> None:
        self.config = config or self.presets["reference"]

    def config_dict(self) -> dict[str, Any]:
        # offload_base moves weights, never numbers: it stays out of the store key
        return {**{k: v for k, v in asdict(self.config).items() if k != "offload_base"}, "version": 1}

    def layout_of(self, content_ids: list[int], placeholder: int) -> tuple[list[int], list[int]]:
        """The candidate's content with placeholders, and the placeholders' indices in it."""
        raise NotImplementedError

    def run(self, case: Case, prompt: FittedPrompt, context: AttackContext,
            on_step: StepCallback | None = None) -> AttackOutcome:
        import torch

        from ..render import noise_schedule

        config, layout = self.config, context.layout
        if context.target is None:
            raise UnlearnAtkError(f"{self.name} needs target images: give a base model (base=, --unlearn-base)")
        if context.base is None:
            raise UnlearnAtkError(f"{self.name} runs the base model in its loop: give one (base=, --unlearn-base)")
        pipeline = context.model.pipeline
        for module in (pipeline.text_encoder, pipeline.unet, pipeline.vae):
            module.requires_grad_(False).eval()
        device = pipeline.device
        plain_ids = layout.sequence(prompt.content_ids)
        target_latent = encode_target(pipeline, context.target(case, plain_ids))  # before any offloading
        base = context.base.load() if hasattr(context.base, "is_loaded") else context.base
        base_pipeline = base.pipeline
        if base_pipeline.unet.config.sample_size != pipeline.unet.config.sample_size:
            raise UnlearnAtkError(f"{self.name}: the base model's latents differ in size from the unlearned model's")
        started = time.perf_counter()
        with torch.no_grad():
            base_hidden = base_pipeline.text_encoder(torch.tensor([plain_ids], device=base_pipeline.device))[0]
        content, slots = self.layout_of(list(prompt.content_ids), layout.pad_id)
        ids = torch.tensor([layout.sequence(content)], device=device)
        table = pipeline.text_encoder.get_input_embeddings().weight.detach()
        unit_table = torch.nn.functional.normalize(table.float(), dim=-1)
        banned = torch.tensor(sorted({layout.bos_id, layout.eos_id, layout.pad_id}), device=device)
        generator = torch.Generator(device="cpu").manual_seed(config.seed * 1_000_003 + case.seed)
        start_ids = torch.randint(0, layout.vocab_size, (len(slots),), generator=generator)
        soft = table[start_ids.to(device)].float().clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([soft], lr=config.lr, weight_decay=config.weight_decay)
        alphas = noise_schedule(pipeline).to(device=device, dtype=torch.float32)
        injector = EmbeddingInjector(pipeline.text_encoder, [1 + slot for slot in slots])

        def nearest() -> Any:
            with torch.no_grad():
                scores = torch.nn.functional.normalize(soft.detach(), dim=-1) @ unit_table.T
                scores[:, banned] = -torch.inf
                return scores.argmax(dim=-1)

        outcome, last_checked = AttackOutcome(), None
        swap = _Swap(pipeline.unet, base_pipeline.unet, device) if config.offload_base else None
        try:
            with injector.active():
                done = 0
                while done < config.iterations:
                    block = min(config.eval_step, config.iterations - done)
                    timesteps = torch.randint(0, len(alphas), (block,), generator=generator)
                    noises = torch.randn((block, *target_latent.shape[1:]), generator=generator)
                    noisy, wanted = [], []
                    with swap.base_turn() if swap else contextlib.nullcontext(), torch.no_grad():
                        for t, noise in zip(timesteps.tolist(), noises):
                            a = alphas[t]
                            latent = a.sqrt() * target_latent + (1 - a).sqrt() * noise.to(device).unsqueeze(0)
                            noisy.append(latent)
                            base_device = next(base_pipeline.unet.parameters()).device  # where it is now
                            wanted.append(base_pipeline.unet(
                                latent.to(base_device, base_pipeline.unet.dtype), torch.tensor([t], device=base_device),
                                encoder_hidden_states=base_hidden.to(base_device)).sample.float().to(device))
                    for t, latent, goal in zip(timesteps.tolist(), noisy, wanted):
                        projected = table[nearest()].float().requires_grad_(True)
                        injector.embeddings = projected
                        hidden = pipeline.text_encoder(ids)[0]
                        injector.embeddings = None
                        prediction = pipeline.unet(latent.to(pipeline.unet.dtype), torch.tensor([t], device=device),
                                                   encoder_hidden_states=hidden).sample.float()
                        loss = torch.nn.functional.mse_loss(prediction, goal)
                        (soft.grad,) = torch.autograd.grad(loss, [projected])
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        outcome.loss_trace.append(loss.item())
                        done += 1
                        outcome.steps = done
                        if on_step is not None:
                            on_step([(case, done, config.iterations)])
                    outcome.optimize_seconds += time.perf_counter() - started
                    candidate = nearest().tolist()
                    if candidate == last_checked:
                        outcome.checks.append(CandidateCheck(done, 0, candidate, rendered=False, hit=False,
                                                             score=outcome.checks[-1].score))
                    else:
                        last_checked = candidate
                        full = list(content)
                        for slot, token in zip(slots, candidate):
                            full[slot] = token
                        verdict, image = context.check(layout.sequence(full))
                        outcome.checks.append(CandidateCheck(done, 0, candidate, rendered=True, hit=verdict.hit,
                                                             score=verdict.score))
                        outcome.adversarial_ids, outcome.content_ids = candidate, full
                        outcome.verdict, outcome.image = verdict, image
                        if verdict.hit:
                            outcome.hit, outcome.hit_step = True, done
                            return outcome
                    started = time.perf_counter()
        finally:
            if swap:
                swap.restore()
        return outcome


class _Swap:
    """The unlearned and the base UNet take turns on the device (no-op when it is the CPU)."""

    def __init__(self, unet: Any, base_unet: Any, device: Any) -> None:
        self.unet, self.base_unet, self.device = unet, base_unet, device
        self.base_home = next(base_unet.parameters()).device
        self.active = device.type != "cpu" and unet is not base_unet
        if self.active:
            base_unet.to("cpu")

    @contextlib.contextmanager
    def base_turn(self) -> Iterator[None]:
        if not self.active:
            yield
            return
        import torch

        self.unet.to("cpu")
        self.base_unet.to(self.device)
        try:
            yield
        finally:
            self.base_unet.to("cpu")
            torch.cuda.empty_cache()
            self.unet.to(self.device)

    def restore(self) -> None:
        if self.active:
            self.base_unet.to(self.base_home)


class P4DN(_P4D):
    name = "p4d-n"
    config_class = P4DNConfig
    presets = _presets(P4DNConfig)
    n_adversarial = 0  # the free tokens replace the prompt; the prompt only conditions the base model

    def layout_of(self, content_ids: list[int], placeholder: int) -> tuple[list[int], list[int]]:
        return [placeholder] * self.config.prompt_len, list(range(self.config.prompt_len))


class P4DK(_P4D):
    name = "p4d-k"
    config_class = P4DKConfig
    presets = _presets(P4DKConfig)

    @property
    def n_adversarial(self) -> int:
        return _most_inserted(self.config.every_k)

    def layout_of(self, content_ids: list[int], placeholder: int) -> tuple[list[int], list[int]]:
        return interleave(content_ids, self.config.every_k, placeholder)
