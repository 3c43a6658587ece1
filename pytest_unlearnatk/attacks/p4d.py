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

Cases are batched like UnlearnDiffAtk's (:mod:`.batching`): up to ``batch_size`` cases at once,
each step one text-encoder and one UNet call for all of them, each case in the row of its place
(the calls shrink to the places still taken once no case is left for a place; a place a reused case
holds gets a copy of a live case, whose outputs are dropped); at a block's start the base UNet
predicts the block's steps of each case starting one, in calls of exactly ``batch_size`` of its
steps; the checks of the cases whose block ended are rendered together, each in its row. Each
case keeps its own generator (initial tokens, timesteps, noise), soft embeddings, AdamW state and
check schedule, and its own free-token positions (P4D-k's differ with the prompt's length), so its
tokens and verdict do not depend on which cases share its batch (tests/test_attacks_more.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ..cases import Case
from ..checks import finite, whole
from ..errors import UnlearnAtkError
from ..results import CandidateCheck
from ..tokens import FittedPrompt
from .base import AttackContext, AttackJob, AttackOutcome, StepCallback
from .batching import PlacedBatch, case_memory_bytes, finite_losses
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


class _P4D:
    requires = ("torch", "diffusers", "transformers")
    needs_target = True  # noised latents of the target image
    needs_base = True  # the base UNet's prediction is what the attack matches
    default_preset = "reference"
    name: str

    def __init__(self, config: Any = None) -> None:
        self.config = config or self.presets["reference"]

    def config_dict(self) -> dict[str, Any]:
        # offload_base moves weights, never numbers: it stays out of the store key.
        # "version" changes whenever the same settings would find other tokens (it is part of the
        # store key): 2 = cases batched at the batch's full shape, one loss per row (the batched
        # mean rounds differently from version 1's one-case mean, so a token can flip); 3 = each case
        # runs and is rendered in the row of its place (case index % batch size), its base predictions
        # in calls of its own steps, each image decoded alone (rows round differently: see .batching);
        # 4 = a free place takes the next case in order, and once none is left the calls shrink to
        # the places still taken
        return {**{k: v for k, v in asdict(self.config).items() if k != "offload_base"}, "version": 4}

    def layout_of(self, content_ids: list[int], placeholder: int) -> tuple[list[int], list[int]]:
        """The candidate's content with placeholders, and the placeholders' indices in it."""
        raise NotImplementedError

    def run(self, case: Case, prompt: FittedPrompt, context: AttackContext,
            on_step: StepCallback | None = None) -> AttackOutcome:
        """Attack one case (a batch of one)."""
        [(_, outcome)] = self.run_many([AttackJob(case, prompt, context)], batch_size=1, on_step=on_step)
        return outcome

    def run_many(self, jobs: Iterable[AttackJob], batch_size: int | str | None = None,
                 on_step: StepCallback | None = None, compile_unet: bool = False,
                 case_count: int | None = None) -> Iterator[tuple[AttackJob, AttackOutcome]]:
        """Attack the jobs' cases, up to ``batch_size`` at once; yield each case as it finishes.

        As UnlearnDiffAtk's ``run_many`` (see :mod:`.batching`): each step runs the text encoder
        and the unlearned UNet once for the whole batch, each case in the row of its place (see
        :mod:`.batching` for the rows and shapes of the calls); at the
        start of a block the base UNet computes the block's predictions of each case starting one,
        in calls of ``batch_size`` of its steps; checks are rendered together, each in the row of its
        place. Each case
        keeps its own generator, soft embeddings, AdamW state and check schedule, so its tokens and
        verdict do not depend on which cases share its batch. ``batch_size``: a number, or
        ``"auto"`` (decided on the model's device and size, conservatively: see ``_setup``).
        ``compile_unet`` is ignored. ``case_count``: the gate's number of cases, a cap on the batch.
        """
        yield from _P4DBatch(self, iter(jobs), batch_size, on_step, case_count).run()


@dataclass
class _P4DSlot:
    """One case in the batch: its free tokens, their soft embeddings and optimizer, its block."""

    job: AttackJob
    content: list[int]  # the candidate's content, placeholders at the free tokens
    free: list[int]  # the free tokens' indices in ``content``
    ids: list[int]  # the id sequence the text encoder reads (the free tokens' embeddings are injected)
    target_latent: Any  # (1, C, H, W)
    base_hidden: Any  # the base text encoder's features of the plain prompt, (1, length, width)
    generator: Any  # the case's own: initial tokens, then each block's timesteps and noise
    soft: Any  # (free tokens, width) float32: the optimized soft embeddings
    optimizer: Any  # AdamW on ``soft``
    outcome: AttackOutcome = field(default_factory=AttackOutcome)
    step_in_block: int = 0
    block_length: int = 0
    timesteps: list[int] = field(default_factory=list)  # the block's
    noisy: Any = None  # (block length, C, H, W): the target latent noised at each step of the block
    wanted: Any = None  # (block length, C, H, W): the base UNet's predictions on them
    block_losses: list[Any] = field(default_factory=list)
    last_checked: list[int] | None = None
    place: int = 0  # its row in the batch's model calls (set by the loop)


# "auto" batch size: one case is charged this many times what case_memory_bytes estimates for an
# UnlearnDiffAtk case (the activations its backward pass through the unlearned UNet keeps). The
# base's forward keeps no activations (no gradient): benchmarks/memory.py --p4d measured the same
# growth per case as UnlearnDiffAtk's on the medium SD-shaped model (0.36 vs 0.37 GiB per case from
# batch 1 to 4, CPU, float32), so the charge is the same. The base's weights are a fixed cost, not a
# case's: the size is decided after the base is loaded (and, with offload_base, moved off the
# device), so free memory already counts them.
CASE_MEMORY_FACTOR = 1


class _P4DBatch(PlacedBatch):
    """P4D's optimization loop over a changing batch of cases (see ``_P4D.run_many``)."""

    def __init__(self, attack: _P4D, jobs: Iterator[AttackJob], batch_size: int | str | None,
                 on_step: StepCallback | None, case_count: int | None = None) -> None:
        super().__init__(jobs, batch_size, on_step, case_count)
        self.attack, self.config = attack, attack.config
        self.max_steps = attack.config.iterations
        self.swap: _Swap | None = None

    def run(self) -> Iterator[tuple[AttackJob, AttackOutcome]]:
        try:
            yield from super().run()
        finally:
            if self.swap is not None:
                self.swap.restore()

    def _base_turn(self) -> Any:
        return self.swap.base_turn() if self.swap is not None else contextlib.nullcontext()

    # --- the batch ------------------------------------------------------------------------

    def _setup(self, context: AttackContext) -> None:
        import torch

        from ..render import noise_schedule

        name = self.attack.name
        if context.target is None:
            raise UnlearnAtkError(f"{name} needs target images: give a base model (base=, --unlearn-base)")
        if context.base is None:
            raise UnlearnAtkError(f"{name} runs the base model in its loop: give one (base=, --unlearn-base)")
        pipeline = self.pipeline = context.model.pipeline
        for module in (pipeline.text_encoder, pipeline.unet, pipeline.vae):
            module.requires_grad_(False).eval()
        self.device = pipeline.device
        self.base_source = context.base
        base = context.base.load() if hasattr(context.base, "is_loaded") else context.base
        self.base_pipeline = base.pipeline
        if self.base_pipeline.unet.config.sample_size != pipeline.unet.config.sample_size:
            raise UnlearnAtkError(f"{name}: the base model's latents differ in size from the unlearned model's")
        self.table = pipeline.text_encoder.get_input_embeddings().weight.detach()
        self.unit_table = torch.nn.functional.normalize(self.table.float(), dim=-1)
        layout = context.layout
        self.banned = torch.tensor(sorted({layout.bos_id, layout.eos_id, layout.pad_id}), device=self.device)
        self.alphas = noise_schedule(pipeline).to(device=self.device, dtype=torch.float32)
        self.injector = EmbeddingInjector(pipeline.text_encoder, [])  # each row's positions: see _restack
        if self.config.offload_base:
            self.swap = _Swap(pipeline.unet, self.base_pipeline.unet, self.device)
        case_bytes = case_memory_bytes(pipeline.unet.config, pipeline.unet.dtype.itemsize)
        self._resolve_batch(self.device, CASE_MEMORY_FACTOR * case_bytes)

    def _new_slot(self, job: AttackJob) -> _P4DSlot:
        import torch

        context, config, name = job.context, self.config, self.attack.name
        if context.target is None:
            raise UnlearnAtkError(f"{name} needs target images: give a base model (base=, --unlearn-base)")
        if context.base is not self.base_source:
            raise UnlearnAtkError(f"{name}: all cases of one batch must match the same base model")
        layout = context.layout
        plain_ids = layout.sequence(job.prompt.content_ids)
        with self._base_turn():  # the base renders the target (unless it is cached)
            target = context.target(job.case, plain_ids)
        text_encoder = self.base_pipeline.text_encoder
        with torch.no_grad():  # alone, so that it does not depend on the batch
            base_hidden = text_encoder(torch.tensor([plain_ids], device=text_encoder.device))[0]
        content, free = self.attack.layout_of(list(job.prompt.content_ids), layout.pad_id)
        generator = torch.Generator(device="cpu").manual_seed(config.seed * 1_000_003 + job.case.seed)
        start_ids = torch.randint(0, layout.vocab_size, (len(free),), generator=generator)
        soft = self.table[start_ids.to(self.device)].float().clone().requires_grad_(True)
        return _P4DSlot(job=job, content=content, free=free, ids=layout.sequence(content),
                        target_latent=encode_target(self.pipeline, target), base_hidden=base_hidden,
                        generator=generator, soft=soft,
                        optimizer=torch.optim.AdamW([soft], lr=config.lr, weight_decay=config.weight_decay))

    def _joined(self, added: int) -> None:
        self._restack()

    def _rows_changed(self) -> None:
        self._restack()

    def _left(self, keep: list[int]) -> None:
        self._restack()

    def _restack(self) -> None:
        """The text encoder's ids and each row's free-token positions, one per row of the calls."""
        import torch

        if not self.slots:
            return
        rows = self.padded(self.slots)
        self.ids = torch.tensor([slot.ids for slot in rows], device=self.device)
        self.injector.positions = [[1 + index for index in slot.free] for slot in rows]  # after BOS

    # --- the loop -------------------------------------------------------------------------

    def _enter(self, stack: contextlib.ExitStack) -> None:
        stack.enter_context(self.injector.active())

    def _block_ended(self, slot: _P4DSlot) -> bool:
        return slot.step_in_block == slot.block_length

    def _nearest(self, slot: _P4DSlot) -> Any:
        """The vocabulary tokens nearest (cosine) to the case's soft embeddings, computed alone."""
        import torch

        with torch.no_grad():
            scores = torch.nn.functional.normalize(slot.soft.detach(), dim=-1) @ self.unit_table.T
            scores[:, self.banned] = -torch.inf
            return scores.argmax(dim=-1)

    def _start_blocks(self, starting: list[_P4DSlot]) -> None:
        """Draw the block's timesteps and noise of each starting case (from its own generator) and
        have the base UNet predict its noise on them: each case's steps in calls of exactly
        ``batch_size`` rows, step ``j`` in row ``j % batch_size`` (the last call padded with copies
        of its last step), so a prediction does not depend on which cases start a block with it."""
        import torch

        config, device, rows = self.config, self.device, self.batch_size
        unet = self.base_pipeline.unet
        with self._base_turn(), torch.no_grad():
            base_device = next(unet.parameters()).device  # where it is now
            for slot in starting:
                length = min(config.eval_step, config.iterations - slot.outcome.steps)
                timesteps = torch.randint(0, len(self.alphas), (length,), generator=slot.generator)
                noises = torch.randn((length, *slot.target_latent.shape[1:]), generator=slot.generator).to(device)
                a = self.alphas[timesteps.to(device)].view(-1, 1, 1, 1)
                slot.noisy = a.sqrt() * slot.target_latent + (1 - a).sqrt() * noises
                slot.timesteps, slot.block_length = timesteps.tolist(), length
                wanted = []
                for first in range(0, length, rows):
                    steps = list(range(first, min(first + rows, length)))
                    steps += [steps[-1]] * (rows - len(steps))
                    wanted.append(unet(
                        slot.noisy[steps].to(base_device, unet.dtype),
                        torch.tensor([slot.timesteps[j] for j in steps], device=base_device),
                        encoder_hidden_states=slot.base_hidden.to(base_device).expand(rows, -1, -1),
                    ).sample.float().to(device))
                slot.wanted = torch.cat(wanted)[:length]

    def _step(self) -> None:
        """One AdamW step on every case's soft embeddings, through their nearest tokens."""
        import torch

        slots = self.slots
        starting = [slot for slot in slots if slot.step_in_block == 0]
        if starting:
            self._start_blocks(starting)
        rows = self.padded(slots)
        # the nearest tokens' embeddings: the gradient on them updates the soft embeddings
        projected = self.table[torch.cat([self._nearest(slot) for slot in slots])].float().requires_grad_(True)
        # each case's in the rows of its place; a filler row's copy: outside the gradient
        self.injector.embeddings = self.padded_rows(list(projected.split([len(slot.free) for slot in slots])))
        hidden = self.pipeline.text_encoder(self.ids)[0]
        self.injector.embeddings = None
        at = [slot.step_in_block for slot in rows]
        noisy = torch.cat([slot.noisy[j:j + 1] for slot, j in zip(rows, at)]).to(self.pipeline.unet.dtype)
        timesteps = torch.tensor([slot.timesteps[j] for slot, j in zip(rows, at)], device=self.device)
        wanted = torch.cat([slot.wanted[j:j + 1] for slot, j in zip(rows, at)])
        prediction = self.pipeline.unet(noisy, timesteps, encoder_hidden_states=hidden).sample.float()
        losses = self.per_case((prediction - wanted).pow(2).mean(dim=(1, 2, 3)))  # one MSE per case
        (grad,) = torch.autograd.grad(losses.sum(), [projected])  # the sum keeps each case's gradient its own
        for slot, slot_grad, loss in zip(slots, grad.split([len(slot.free) for slot in slots]), losses.detach()):
            slot.soft.grad = slot_grad
            slot.optimizer.step()
            slot.optimizer.zero_grad(set_to_none=True)
            slot.block_losses.append(loss)

    def _end_blocks(self, ended: list[int]) -> list[int]:
        """Check the nearest tokens of the cases whose block just ended; return the finished ones."""
        requests, waiting = [], []
        for i in ended:
            slot = self.slots[i]
            outcome = slot.outcome
            outcome.loss_trace.extend(finite_losses(slot.block_losses, self.attack.name, slot.job.case, outcome.steps,
                                                    "loss (the distance to the base model's prediction)"))
            slot.block_losses, slot.step_in_block, slot.noisy, slot.wanted = [], 0, None, None
            candidate = self._nearest(slot).tolist()
            if candidate == slot.last_checked:  # same tokens, same image: it was a miss already
                outcome.checks.append(CandidateCheck(outcome.steps, 0, candidate, rendered=False, hit=False,
                                                     score=outcome.checks[-1].score))
                continue
            slot.last_checked = candidate
            full = list(slot.content)
            for index, token in zip(slot.free, candidate):
                full[index] = token
            requests.append((slot.job.context.check, slot.job.context.layout.sequence(full)))
            waiting.append((i, candidate, full))
        checked = self.check_many(requests, [i for i, _, _ in waiting])
        for (i, candidate, full), (verdict, image) in zip(waiting, checked):
            outcome = self.slots[i].outcome
            outcome.checks.append(CandidateCheck(outcome.steps, 0, candidate, rendered=True, hit=verdict.hit,
                                                 score=verdict.score))
            outcome.adversarial_ids, outcome.content_ids = candidate, full
            outcome.verdict, outcome.image = verdict, image
            if verdict.hit:
                outcome.hit, outcome.hit_step = True, outcome.steps
        return [i for i in ended if self.slots[i].outcome.hit or self.slots[i].outcome.steps == self.config.iterations]


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
