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
   at the case's seed and guidance and judged. The first hit ends the case. With ``check_text``,
   a candidate that missed is judged a second time as the ids its decoded text tokenizes to. With
   ``candidates_per_check`` n > 1, the argmax tokens are taken n times in the block, and the one
   the model finds the lowest denoising loss for (the attack's own objective, on fixed noise at
   timesteps spread over the schedule) is the block's candidate. With ``position_choices`` m > 1
   (5 in the ``fast`` preset), that candidate is then refined one position at a time: each
   position takes whichever of its m most probable tokens gives the lowest denoising loss, the
   other positions held.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..cases import Case
from ..errors import UnlearnAtkError
from ..render import noise_schedule
from ..results import CandidateCheck
from ..tokens import FittedPrompt
from .base import AttackContext, AttackJob, AttackOutcome, StepCallback
from .batching import AUTO_BATCH_MAX as AUTO_BATCH_MAX  # these lived here: still importable from here
from .batching import PlacedBatch, case_memory_bytes, finite_losses
from .batching import resolve_batch_size as resolve_batch_size

# CLIP reads 77 tokens, two of them BOS and EOS: at most 75 adversarial ones (fewer with the prompt)
MAX_ADVERSARIAL_TOKENS = 75
# noise draws on which candidates_per_check and position_choices compare a block's candidates (the
# same draws for each), each at its own timestep (ranking_timesteps)
RANKING_NOISES = 4
# a bound on position_choices: a block's refinement compares up to n_tokens * (m - 1) + 1 candidates
MAX_POSITION_CHOICES = 100


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
    # after a candidate's ids miss, also judge the ids its decoded text tokenizes to, where they
    # differ (what the reference code judges instead of the ids; docs/method.md, "Success check")
    check_text: bool = False
    # argmax candidates taken per block, evenly spaced, the last at its end; the one of lowest
    # denoising loss on the target (RANKING_NOISES fixed noise draws at ranking_timesteps) is checked
    candidates_per_check: int = 1
    # each adversarial position in turn takes whichever of its m most probable tokens gives the block's
    # candidate the lowest denoising loss (same noise draws); 1: the argmax tokens as they are (the paper)
    position_choices: int = 1

    def __post_init__(self) -> None:
        from ..checks import finite, whole

        if not isinstance(self.check_text, bool):
            raise UnlearnAtkError(f"UnlearnDiffAtk check_text is {self.check_text!r}; it must be true or false")

        whole(self.n_tokens, "UnlearnDiffAtk n_tokens", 1, MAX_ADVERSARIAL_TOKENS)
        whole(self.num_timesteps, "UnlearnDiffAtk num_timesteps", 1, 1000)
        whole(self.steps_per_timestep, "UnlearnDiffAtk steps_per_timestep", 1, 100_000)
        whole(self.seed, "UnlearnDiffAtk seed", 0, 2**31)
        whole(self.candidates_per_check, "UnlearnDiffAtk candidates_per_check", 1)
        whole(self.position_choices, "UnlearnDiffAtk position_choices", 1, MAX_POSITION_CHOICES)
        if self.candidates_per_check > self.steps_per_timestep:
            raise UnlearnAtkError(f"UnlearnDiffAtk candidates_per_check is {self.candidates_per_check}, more than its "
                                  f"{self.steps_per_timestep} steps_per_timestep; take at most one candidate per step")
        if finite(self.lr, "UnlearnDiffAtk lr", 0) == 0:
            raise UnlearnAtkError("UnlearnDiffAtk lr is 0; it must be positive")
        finite(self.weight_decay, "UnlearnDiffAtk weight_decay", 0)
        finite(self.grad_clip, "UnlearnDiffAtk grad_clip", 0)

    @property
    def max_steps(self) -> int:
        return self.num_timesteps * self.steps_per_timestep

    @property
    def candidate_steps(self) -> list[int]:
        """The steps into a block after which its argmax tokens are taken as a candidate."""
        n, steps = self.candidates_per_check, self.steps_per_timestep
        return sorted({-(-steps * j // n) for j in range(1, n + 1)})

    def timesteps(self, num_train_timesteps: int) -> list[int]:
        """The swept timesteps, in the order they are visited."""
        stride = num_train_timesteps // self.num_timesteps
        if stride < 1:
            raise UnlearnAtkError(f"num_timesteps={self.num_timesteps} exceeds the model's {num_train_timesteps} timesteps")
        return list(range(stride // 2, num_train_timesteps, stride))[: self.num_timesteps]


PRESETS: dict[str, UnlearnDiffAtkConfig] = {
    # The paper's settings, unchanged: 50 timesteps x 40 steps, at most 2000 steps and 51 renders.
    "reference": UnlearnDiffAtkConfig(),
    # A tenth of the optimization: 10 timesteps x 20 steps, at most 11 renders per case; each check's
    # candidate refined among each position's 5 most probable tokens (docs/validity.md, "Ranking at
    # timesteps across the schedule": on the toy zoo it broke more of every model at the same renders)
    "fast": UnlearnDiffAtkConfig(num_timesteps=10, steps_per_timestep=20, position_choices=5),
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


def simplex_threshold(rows: Any, scratch: Any = None, guess: Any = None, max_iterations: int = 64) -> Any:
    """The tau (rows, 1) for which ``clip(row - tau, 0)`` sums to 1: that clip is the Euclidean
    projection of the row onto the probability simplex {p : p >= 0, sum p = 1}, exact up to
    rounding.

    ``g(tau) = sum(clip(row - tau, 0))`` is convex, piecewise linear and decreasing, so Newton's
    method started below the root climbs to it monotonically and stops exactly, once the set of
    values above tau no longer changes: each step is ``tau = (sum of the values above tau - 1) /
    their count``. That step taken from *any* point lands at or below the root, so the start is
    the larger of two such lower bounds: the step from ``guess`` (say the tau of a similar row,
    like the same row's one step earlier) and ``(sum(row) - 1) / n``. On the attack's rows that
    is about 4 steps of 4 passes each with the previous step's tau as guess (8 without), against
    ~80 passes for a bisection to float32 resolution. The convergence test needs the host; on a
    GPU it is made every 8 steps only (steps at the root change nothing). ``scratch``, a tensor
    like ``rows``, saves allocating one.
    """
    import torch

    scratch = torch.empty_like(rows) if scratch is None else scratch
    tau = (rows.sum(dim=-1, keepdim=True) - 1) / rows.shape[-1]  # g(tau) >= sum(row - tau) = 1
    if guess is not None:
        above = torch.gt(rows, guess, out=scratch)  # 1.0 where the row is above the guess
        count = above.sum(dim=-1, keepdim=True).clamp_(min=1)
        tau = torch.maximum(tau, (above.mul_(rows).sum(dim=-1, keepdim=True) - 1) / count)
    check_every = 1 if rows.device.type == "cpu" else 8
    count = None
    for iteration in range(max_iterations):
        above = torch.gt(rows, tau, out=scratch)
        new_count = above.sum(dim=-1, keepdim=True)  # >= 1: tau stays below the row's maximum
        if iteration % check_every == 0 and count is not None and torch.equal(new_count, count):
            break  # the same values above tau (tau only rises): the next tau would be this one
        count = new_count
        tau = (above.mul_(rows).sum(dim=-1, keepdim=True) - 1) / count
    return tau


def sample_tokens(probabilities: Any, uniforms: Any, chunk: int = 256) -> Any:
    """One id per row of ``probabilities`` (rows, vocab), by inverse CDF at ``uniforms`` (rows,).

    Two levels, so that no vocabulary-long running sum is needed (a serial scan, the slowest pass
    of a step on the CPU): pick the chunk of ``chunk`` ids whose cumulative mass holds
    ``uniform * total``, then the id inside it. Like a full inverse CDF, it only returns ids of
    positive probability.
    """
    import torch

    rows, vocab = probabilities.shape
    n_chunks = -(-vocab // chunk)
    padded = probabilities if vocab % chunk == 0 else torch.nn.functional.pad(probabilities, (0, n_chunks * chunk - vocab))
    blocks = padded.view(rows, n_chunks, chunk)
    chunk_mass = blocks.sum(dim=-1)
    chunk_cdf = chunk_mass.cumsum(dim=-1)
    wanted = uniforms.view(rows, 1).to(chunk_cdf.dtype) * chunk_cdf[:, -1:]
    # rounding can put ``wanted`` at the total, past every chunk: then take the last chunk with mass
    last_chunk = n_chunks - 1 - (chunk_mass.flip(-1) > 0).to(torch.uint8).argmax(dim=-1, keepdim=True)
    which = torch.minimum(torch.searchsorted(chunk_cdf, wanted, right=True), last_chunk)  # (rows, 1)
    inside = blocks.gather(1, which.unsqueeze(-1).expand(rows, 1, chunk)).squeeze(1)  # (rows, chunk)
    rest = wanted - (chunk_cdf.gather(1, which) - chunk_mass.gather(1, which))  # mass still to cover
    offset = torch.searchsorted(inside.cumsum(dim=-1), rest, right=True)
    # and likewise inside the chunk
    last_positive = chunk - 1 - (inside.flip(-1) > 0).to(torch.uint8).argmax(dim=-1, keepdim=True)
    offset = torch.minimum(offset, last_positive)
    return (which * chunk + offset).squeeze(1)


def adam_step_per_case(parameters: Any, grads: Any, exp_avgs: Any, exp_avg_sqs: Any, steps: list[Any],
                       lr: float, weight_decay: float) -> None:
    """One ``torch.optim.Adam`` update (L2 weight decay; betas, eps: torch's defaults, as in the
    paper's code) of each case's rows, in place; the tensors are (cases, ...), ``steps`` holds one
    0-d step count per case, advanced here.

    It calls the kernel behind ``torch.optim.Adam(fused=True)`` on each case's rows (views into
    the batch): one pass over parameters, gradient and moments instead of the nine of an unfused
    update. tests/test_attack.py checks it against ``torch.optim.Adam``.
    """
    import torch

    torch._foreach_add_(steps, 1)
    torch._fused_adam_(
        list(parameters.unbind(0)), list(grads.unbind(0)), list(exp_avgs.unbind(0)), list(exp_avg_sqs.unbind(0)),
        [], steps, lr=lr, beta1=0.9, beta2=0.999, weight_decay=weight_decay, eps=1e-8, amsgrad=False, maximize=False,
    )


class EmbeddingInjector:
    """Replaces the token embeddings at given positions, by a forward hook on the input embedding.

    The hook on ``get_input_embeddings()`` works on every transformers version; passing embeddings
    through ``forward`` arguments does not (transformers 5's CLIPTextModel takes only ids).
    ``positions`` is one list of positions for every sequence of the batch: ``embeddings`` is then
    ``(n_positions, width)`` for every sequence, or ``(batch, n_positions, width)``, one row per
    sequence. Or it is one list per sequence (their places and numbers may differ, as P4D-k's free
    tokens between prompts of different lengths): ``embeddings`` is then ``(total, width)``, the
    first sequence's positions' rows, then the second's, and so on.
    """

    def __init__(self, text_encoder: Any, positions: list[int] | list[list[int]]) -> None:
        self.module = text_encoder.get_input_embeddings()
        self.positions = positions
        self.embeddings: Any = None  # None = leave the embeddings alone

    def _hook(self, module: Any, args: Any, output: Any) -> Any:
        if self.embeddings is None:
            return output
        output = output.clone()
        embeddings = self.embeddings.to(output.dtype)
        if self.positions and isinstance(self.positions[0], (list, tuple)):  # each sequence its own positions
            rows = [row for row, positions in enumerate(self.positions) for _ in positions]
            output[rows, [position for positions in self.positions for position in positions]] = embeddings
            return output
        if embeddings.dim() == 2:
            embeddings = embeddings.unsqueeze(0).expand(output.shape[0], -1, -1)
        output[:, self.positions] = embeddings
        return output

    @contextlib.contextmanager
    def active(self) -> Iterator[EmbeddingInjector]:
        handle = self.module.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()
            self.embeddings = None


@functools.cache
def _straight_through_lookup() -> Any:
    """``apply(probabilities, sampled, table)``: the rows of ``table`` for the sampled ids; the
    gradient on them reaches ``probabilities`` as if the lookup were ``one_hot(sampled) @ table``.

    Same values and gradients as the one-hot product, without its vocabulary-sized forward matmul.
    """
    import torch

    class StraightThroughLookup(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, probabilities: Any, sampled: Any, table: Any) -> Any:
            ctx.save_for_backward(table)
            ctx.probability_dtype = probabilities.dtype
            return table[sampled]

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            (table,) = ctx.saved_tensors
            return (grad.to(table.dtype) @ table.T).to(ctx.probability_dtype), None, None

    return StraightThroughLookup


@dataclass
class _Slot:
    """One case in the batch: its job, where it is in the timestep sweep, what it found so far."""

    job: AttackJob
    ids: list[int]
    target_latent: Any
    generator: Any
    timesteps: list[int]
    adam_step: Any  # 0-d float tensor on the device: the case's own Adam step count
    outcome: AttackOutcome = field(default_factory=AttackOutcome)
    block: int = 0  # index into timesteps
    step_in_block: int = 0
    block_losses: list[Any] = field(default_factory=list)
    last_checked: list[int] | None = None
    candidates: list[list[int]] = field(default_factory=list)  # taken earlier in the block (candidates_per_check)
    place: int = 0  # its row in the batch's model calls (set by the loop)

    @property
    def timestep(self) -> int:
        return self.timesteps[self.block]


class UnlearnDiffAtk:
    name = "unlearndiffatk"
    config_class = UnlearnDiffAtkConfig
    presets = PRESETS
    default_preset = "reference"
    requires = ("torch", "diffusers", "transformers")
    needs_target = True

    def __init__(self, config: UnlearnDiffAtkConfig | None = None) -> None:
        self.config = config or PRESETS["reference"]

    @property
    def n_adversarial(self) -> int:
        return self.config.n_tokens

    def config_dict(self) -> dict[str, Any]:
        # "version" changes whenever the same settings would find other tokens (it is part of the
        # store key): 2 = inverse-CDF token sampling, per-case Adam in a batch; 3 = the exact Newton
        # projection (it rounds differently from the bisection of version 2); 4 = the model always
        # runs the batch's full shape, and checks are rendered alone (other rounding in part-full batches);
        # 5 = checks are rendered in batches of the attack's batch size (other rounding than alone);
        # 6 = each case runs and is rendered in the row of its place (case index % batch size), and
        # each image is decoded alone (rows round differently: see .batching); 7 = a free place takes
        # the next case in order, and once no case is left the calls shrink to the places still taken
        # (other places and shapes round differently)
        settings = asdict(self.config)
        # added at version 6: left out at their defaults
        if not settings["check_text"]:
            del settings["check_text"]
        if settings["candidates_per_check"] == 1:
            del settings["candidates_per_check"]
        if settings["position_choices"] == 1:
            del settings["position_choices"]
        if "candidates_per_check" in settings or "position_choices" in settings:
            # 2 = candidates compared at ranking_timesteps (spread over the schedule); 1 (unnamed) = at
            # the block's timestep
            settings["ranking_version"] = 2
        return {**settings, "version": 7}

    def run(self, case: Case, prompt: FittedPrompt, context: AttackContext) -> AttackOutcome:
        """Attack one case (a batch of one)."""
        [(_, outcome)] = self.run_many([AttackJob(case, prompt, context)], batch_size=1)
        return outcome

    def run_many(self, jobs: Iterable[AttackJob], batch_size: int | str | None = None,
                 on_step: StepCallback | None = None, compile_unet: bool = False,
                 case_count: int | None = None) -> Iterator[tuple[AttackJob, AttackOutcome]]:
        """Attack the jobs' cases, up to ``batch_size`` at once; yield each case as it finishes.

        The cases of a batch share every text-encoder and UNet call, each case in the row of its
        place, and their success checks are rendered together, each in its row of one render of
        the calls' rows (padded), then judged one by one; a finished case's place goes to the next
        job, and once none is left the calls shrink to the places still taken (see
        :mod:`.batching`). Each case
        keeps its own generator, optimizer state and timestep sweep, so it gets the tokens and
        verdict it gets alone at its place (losses agree up to float rounding). ``jobs`` is read
        lazily: only as far as a free place needs. ``batch_size``: a number, or ``"auto"``
        (see :func:`resolve_batch_size`; decided on the model's device and its size).
        ``compile_unet``: run the attack's UNet calls through ``torch.compile`` (worth it on a GPU
        for long gates; the first steps compile). ``case_count``: the gate's number of cases, a cap
        on the batch.
        """
        yield from _BatchedOptimization(self.config, iter(jobs), batch_size, on_step, compile_unet, case_count).run()


class _BatchedOptimization(PlacedBatch):
    """The optimization loop of UnlearnDiffAtk over a changing batch of cases (see ``run_many``)."""

    def __init__(self, config: UnlearnDiffAtkConfig, jobs: Iterator[AttackJob], batch_size: int | str | None,
                 on_step: StepCallback | None, compile_unet: bool = False, case_count: int | None = None) -> None:
        super().__init__(jobs, batch_size, on_step, case_count)
        self.config, self.compile_unet = config, compile_unet
        self.max_steps = config.max_steps
        self.inner_candidate_steps = set(config.candidate_steps[:-1])  # the block's last is taken as it ends

    # --- the batch: slots and their stacked state -----------------------------------------

    def _setup(self, context: AttackContext) -> None:
        import torch

        pipeline = self.pipeline = context.model.pipeline
        for module in (pipeline.text_encoder, pipeline.unet, pipeline.vae):
            module.requires_grad_(False).eval()
        self.device = pipeline.device
        self.unet = torch.compile(pipeline.unet) if self.compile_unet else pipeline.unet  # same weights
        self.unet_dtype = pipeline.unet.dtype  # diffusers walks the model to answer this (0.3-1 ms)
        self._resolve_batch(self.device, case_memory_bytes(pipeline.unet.config, self.unet_dtype.itemsize))
        self.table = pipeline.text_encoder.get_input_embeddings().weight  # (vocab, width)
        # on a GPU with half-precision weights, the model runs under autocast; the adversarial
        # variables (probabilities, Adam state, loss) stay float32 throughout
        half = self.table.dtype in (torch.float16, torch.bfloat16)
        self.autocast_dtype = self.table.dtype if self.device.type == "cuda" and half else None
        self.vocab = self.table.shape[0]
        self.alphas_cumprod = noise_schedule(pipeline).to(device=self.device, dtype=torch.float32)
        self.ranking_timesteps = ranking_timesteps(len(self.alphas_cumprod))
        self.v_prediction = pipeline.scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
        self.injector = EmbeddingInjector(pipeline.text_encoder, list(range(1, 1 + self.config.n_tokens)))
        k = self.config.n_tokens
        empty = torch.zeros((0, k, self.vocab), device=self.device, dtype=torch.float32)
        self.probabilities, self.exp_avg, self.exp_avg_sq = empty.clone(), empty.clone(), empty.clone()
        # each row's simplex threshold at its last step: the guess for its next projection
        self.thresholds = torch.zeros((0, k, 1), device=self.device, dtype=torch.float32)

    def _new_slot(self, job: AttackJob) -> _Slot:
        import torch

        context = job.context
        if context.target is None:
            raise UnlearnAtkError(
                "UnlearnDiffAtk needs target images: give a base model (base=, --unlearn-base) or a target directory"
            )
        layout, k = context.layout, self.config.n_tokens
        plain_ids = layout.sequence(job.prompt.content_ids)
        return _Slot(
            job=job,
            ids=layout.sequence(job.prompt.content_ids, [layout.pad_id] * k),
            target_latent=encode_target(self.pipeline, context.target(job.case, plain_ids)),
            generator=torch.Generator(device=self.device).manual_seed(self.config.seed * 1_000_003 + job.case.seed),
            timesteps=self.config.timesteps(len(self.alphas_cumprod)),
            adam_step=torch.zeros((), device=self.device, dtype=torch.float32),
        )

    def _joined(self, added: int) -> None:
        """New cases start uniform."""
        import torch

        k = self.config.n_tokens
        uniform = torch.full((added, k, self.vocab), 1.0 / self.vocab, device=self.device, dtype=torch.float32)
        zeros = torch.zeros_like(uniform)
        self.probabilities = torch.cat([self.probabilities.detach(), uniform])
        self.exp_avg = torch.cat([self.exp_avg, zeros])
        self.exp_avg_sq = torch.cat([self.exp_avg_sq, zeros])
        no_guess = torch.full((added, k, 1), -1.0, device=self.device)  # below every row: a plain start
        self.thresholds = torch.cat([self.thresholds, no_guess])
        self._restack()

    def _rows_changed(self) -> None:
        self._restack()

    def _left(self, keep: list[int]) -> None:
        self.probabilities = self.probabilities.detach()[keep]
        self.exp_avg, self.exp_avg_sq = self.exp_avg[keep], self.exp_avg_sq[keep]
        self.thresholds = self.thresholds[keep]
        self._restack()

    def _restack(self) -> None:
        """Rebuild the per-batch tensors after the batch or a slot's timestep changed."""
        import torch

        if not self.slots:
            return
        self.probabilities.requires_grad_(True)
        if getattr(self, "scratch", None) is None or self.scratch.shape != self.probabilities.shape:
            self.scratch = torch.empty_like(self.probabilities, requires_grad=False)  # reused every step
        # The model sees the rows of the gate's timeline, each case in the row of its place (a
        # place held by a reused case holds a copy of the first case, whose outputs are dropped):
        # so each case's numbers do not depend on which cases share its batch, and so not on where
        # an interrupted run was resumed (see .batching); tests/test_attack.py checks it bit for bit.
        rows = self.padded(self.slots)
        self.ids = torch.tensor([slot.ids for slot in rows], device=self.device)
        self.target_latents = torch.cat([slot.target_latent for slot in rows])
        self.timestep_batch = torch.tensor([slot.timestep for slot in rows], device=self.device)
        alphas = self.alphas_cumprod[self.timestep_batch].view(-1, 1, 1, 1)
        self.signal, self.noise_scale = alphas.sqrt(), (1 - alphas).sqrt()

    # --- the loop -------------------------------------------------------------------------

    def _enter(self, stack: contextlib.ExitStack) -> None:
        stack.enter_context(self.injector.active())

    def _block_ended(self, slot: _Slot) -> bool:
        return slot.step_in_block == self.config.steps_per_timestep

    def _next_blocks(self) -> None:
        self._restack()  # the slots that ended a block move to their next timestep

    def _step(self) -> None:
        """One Adam step on every case's token probabilities."""
        import torch

        config, slots, probabilities = self.config, self.slots, self.probabilities
        k = config.n_tokens
        probabilities.grad = None
        with torch.no_grad():
            # one categorical draw per position: inverse CDF with each case's own generator
            uniforms = torch.stack([torch.rand(k, generator=s.generator, device=self.device) for s in slots])
            sampled = sample_tokens(probabilities.view(-1, self.vocab), uniforms.view(-1)).view(len(slots), k)
            # the rows of the model call, by place (see _restack)
            sampled = self.padded_rows(list(sampled.split(1)))
            noise = self.padded_rows([
                torch.randn(s.target_latent.shape, generator=s.generator, device=self.device, dtype=torch.float32)
                for s in slots
            ])
        autocast = (torch.autocast("cuda", dtype=self.autocast_dtype) if self.autocast_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            rows = self.padded_rows(list(probabilities.split(1)))  # a filler row: outside the gradient
            self.injector.embeddings = _straight_through_lookup().apply(rows, sampled, self.table)
            hidden = self.pipeline.text_encoder(self.ids)[0]
            self.injector.embeddings = None
            noisy = (self.signal * self.target_latents + self.noise_scale * noise).to(self.unet_dtype)
            prediction = self.unet(noisy, self.timestep_batch, encoder_hidden_states=hidden).sample.float()
        wanted = self.signal * noise - self.noise_scale * self.target_latents if self.v_prediction else noise
        losses = self.per_case((prediction - wanted).pow(2).mean(dim=(1, 2, 3)))  # one MSE per case
        losses.sum().backward()  # the sum keeps each case's gradient its own
        with torch.no_grad():
            grad = probabilities.grad.clamp_(-config.grad_clip, config.grad_clip)
            adam_step_per_case(probabilities.detach(), grad, self.exp_avg, self.exp_avg_sq,
                               [slot.adam_step for slot in slots], lr=config.lr, weight_decay=config.weight_decay)
            flat = probabilities.view(-1, self.vocab)
            tau = simplex_threshold(flat, scratch=self.scratch.view(-1, self.vocab), guess=self.thresholds.view(-1, 1))
            torch.sub(flat, tau, out=flat).clamp_(min=0)  # the projection onto the simplex, in place
            self.thresholds = tau.view_as(self.thresholds)
        for slot, loss in zip(slots, losses.detach()):
            slot.block_losses.append(loss)
        # candidates taken inside a block (candidates_per_check)
        due = [i for i, slot in enumerate(slots) if slot.step_in_block + 1 in self.inner_candidate_steps]
        if due:
            for i, candidate in zip(due, probabilities.detach()[due].argmax(dim=-1).tolist()):
                slots[i].candidates.append(candidate)

    def _best_candidate(self, slot: _Slot, row: int, last: list[int]) -> list[int]:
        """The block's candidate under ``candidates_per_check`` and ``position_choices``: of the
        block's argmax candidates, the one of the lowest denoising loss on the case's target (the
        first of equals); then, one position at a time, the token among that position's
        ``position_choices`` most probable (row ``row`` of the batch) that lowers the loss most, if
        any does. Losses: on RANKING_NOISES noise draws fixed by the seeds and the block, each at one
        of :func:`ranking_timesteps` (spread over the schedule, whatever the block's timestep). The
        case's own generator is not used, so the optimization is the same as without."""
        import torch

        options: list[list[int]] = []
        for candidate in [*slot.candidates, last]:
            if candidate not in options:
                options.append(candidate)
        slot.candidates = []
        choices = self.config.position_choices
        if len(options) == 1 and choices == 1:
            return last
        noises = ranking_noises(self.config.seed, slot.job.case.seed, slot.block, slot.target_latent)
        layout = slot.job.context.layout
        autocast = (torch.autocast("cuda", dtype=self.autocast_dtype) if self.autocast_dtype is not None
                    else contextlib.nullcontext())

        def losses(candidates: list[list[int]]) -> list[float]:
            sequences = [layout.sequence(slot.job.prompt.content_ids, candidate) for candidate in candidates]
            with autocast:
                found = candidate_losses(self.pipeline, sequences, slot.target_latent, self.ranking_timesteps, noises,
                                         self.alphas_cumprod)
            # a non-finite loss (a half-precision overflow, say) ranks last, not by NaN's comparisons
            return [loss if math.isfinite(loss) else math.inf for loss in found]

        option_losses = losses(options)
        best_loss = min(option_losses)
        best = options[option_losses.index(best_loss)]
        if choices == 1:
            return best
        # a vocabulary smaller than m: every token is a choice
        most_probable = self.probabilities.detach()[row].topk(min(choices, self.vocab), dim=-1).indices.tolist()
        return refine_by_position(best, best_loss, most_probable, losses)

    def _end_blocks(self, ended: list[int]) -> list[int]:
        """Check the argmax tokens of the cases whose block just ended; return the finished ones."""
        candidates = self.probabilities.detach()[ended].argmax(dim=-1).tolist()
        requests, waiting = [], []
        for i, candidate in zip(ended, candidates):
            slot = self.slots[i]
            outcome = slot.outcome
            losses = finite_losses(slot.block_losses, "UnlearnDiffAtk", slot.job.case, outcome.steps,
                                   "denoising loss", f" (t={slot.timestep})")
            outcome.loss_trace.extend(losses)
            slot.block_losses, slot.step_in_block = [], 0
            if self.config.candidates_per_check > 1 or self.config.position_choices > 1:
                # after the loss check: a broken model stops first
                started = time.perf_counter()
                candidate = self._best_candidate(slot, i, candidate)
                outcome.optimize_seconds += time.perf_counter() - started  # the ranking is part of the search
            if candidate == slot.last_checked:  # same tokens, same image: it was a miss already
                last_score = next(check.score for check in reversed(outcome.checks) if not check.text)
                outcome.checks.append(CandidateCheck(outcome.steps, slot.timestep, candidate, rendered=False, hit=False,
                                                     score=last_score))
                continue
            slot.last_checked = candidate
            layout = slot.job.context.layout
            requests.append((slot.job.context.check, layout.sequence(slot.job.prompt.content_ids, candidate)))
            waiting.append((i, candidate))
        checked = self.check_many(requests, [i for i, _ in waiting])
        text_requests, text_waiting = [], []
        for (i, candidate), (verdict, image) in zip(waiting, checked):
            slot = self.slots[i]
            outcome = slot.outcome
            outcome.checks.append(CandidateCheck(outcome.steps, slot.timestep, candidate, rendered=True, hit=verdict.hit,
                                                 score=verdict.score))
            outcome.adversarial_ids, outcome.verdict, outcome.image = candidate, verdict, image
            if verdict.hit:
                outcome.hit, outcome.hit_step, outcome.hit_timestep = True, outcome.steps, slot.timestep
            elif self.config.check_text and (content := self._text_content(slot, candidate)) is not None:
                text_requests.append((slot.job.context.check, slot.job.context.layout.sequence(content)))
                text_waiting.append((i, candidate, content))
        # the second candidates render after the first, each case again in the row of its place
        checked = self.check_many(text_requests, [i for i, _, _ in text_waiting])
        for (i, candidate, content), (verdict, image) in zip(text_waiting, checked):
            slot = self.slots[i]
            outcome = slot.outcome
            outcome.checks.append(CandidateCheck(outcome.steps, slot.timestep, candidate, rendered=True, hit=verdict.hit,
                                                 score=verdict.score, text=True))
            if verdict.hit:
                outcome.content_ids, outcome.verdict, outcome.image = content, verdict, image
                outcome.hit, outcome.hit_step, outcome.hit_timestep = True, outcome.steps, slot.timestep
        finished = []
        for i in ended:
            slot = self.slots[i]
            if slot.outcome.hit or slot.block + 1 == len(slot.timesteps):
                finished.append(i)
            else:
                slot.block += 1
        return finished

    def _text_content(self, slot: _Slot, candidate: list[int]) -> list[int] | None:
        """The ids the candidate's text (its ids and the prompt's, decoded) tokenizes to, where they
        differ from those ids and fit the text encoder; else None."""
        content = list(candidate) + list(slot.job.prompt.content_ids)
        tokenizer = self.pipeline.tokenizer
        text_ids = list(tokenizer(tokenizer.decode(content), add_special_tokens=False).input_ids)
        fits = len(text_ids) <= slot.job.context.layout.content_capacity(0)
        return text_ids if text_ids != content and fits else None


def refine_by_position(start: list[int], start_loss: float, choices: list[list[int]],
                       losses: Callable[[list[list[int]]], list[float]]) -> list[int]:
    """Greedy refinement of the candidate ``start`` (whose loss is ``start_loss``): position by
    position, in order, the token of ``choices[position]`` that gives the lowest loss with the other
    positions held (``losses`` scores a list of candidates) replaces the current one if it lowers
    the loss; the first of equals wins. Each position is visited once."""
    best, best_loss = list(start), start_loss
    for position, tokens in enumerate(choices):
        variants = [[*best[:position], token, *best[position + 1:]] for token in tokens if token != best[position]]
        if not variants:
            continue
        variant_losses = losses(variants)
        if min(variant_losses) < best_loss:
            best_loss = min(variant_losses)
            best = variants[variant_losses.index(best_loss)]
    return best


def encode_target(pipeline: Any, image: Any) -> Any:
    """The VAE's mean latent of ``image`` (resized to the model's size), times the VAE scaling factor."""
    import torch

    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    pixels = pipeline.image_processor.preprocess(image, height=size, width=size)
    with torch.no_grad():
        latent = pipeline.vae.encode(pixels.to(pipeline.device, pipeline.vae.dtype)).latent_dist.mean
    return latent.float() * pipeline.vae.config.scaling_factor


def ranking_noises(attack_seed: int, case_seed: int, block: int, target_latent: Any) -> Any:
    """The RANKING_NOISES noise draws (like ``target_latent``, one per row) on which the candidates
    of a case's block ``block`` are compared: fixed by the seeds and the block alone."""
    import torch

    seed = ((attack_seed * 1_000_003 + case_seed) * 1_009 + block) % 2**64  # case seeds go up to 2**63 - 1
    generator = torch.Generator(device=target_latent.device).manual_seed(seed)
    return torch.randn((RANKING_NOISES, *target_latent.shape[1:]), generator=generator, device=target_latent.device)


def ranking_timesteps(num_train_timesteps: int, n: int = RANKING_NOISES) -> list[int]:
    """The timesteps at which a block's candidates are compared, one per noise draw: the middles of
    ``n`` equal parts of the schedule (125, 375, 625, 875 for 1000 timesteps and 4 draws). A render
    passes through every noise level, so the comparison does too, whichever timestep the block
    optimized (docs/validity.md, "Ranking at timesteps across the schedule")."""
    return [num_train_timesteps * (2 * i + 1) // (2 * n) for i in range(n)]


def candidate_losses(pipeline: Any, sequences: list[list[int]], target_latent: Any, timesteps: int | list[int],
                     noises: Any, alphas_cumprod: Any = None) -> list[float]:
    """The attack's objective for each id sequence, averaged over the same given noise samples
    (n, C, H, W): with fixed noise, it compares prompts fairly (the attack's steps draw fresh noise
    each). ``timesteps``: one for every draw, or one timestep per draw (noise ``i`` at
    ``timesteps[i]``). ``alphas_cumprod``: the model's noise schedule, if already at hand."""
    import torch

    device = target_latent.device
    alphas = (noise_schedule(pipeline) if alphas_cumprod is None else alphas_cumprod).to(device)
    noises = noises.to(device)
    per_draw = [timesteps] * len(noises) if isinstance(timesteps, int) else list(timesteps)
    if len(per_draw) != len(noises):
        raise ValueError(f"{len(per_draw)} timesteps for {len(noises)} noise draws")
    v_prediction = pipeline.scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
    with torch.no_grad():
        hidden = pipeline.text_encoder(torch.tensor(sequences, device=device))[0]
        hidden = hidden.repeat_interleave(len(noises), dim=0)  # sequence i's rows: i * n ... i * n + n - 1
        repeated = noises.repeat(len(sequences), 1, 1, 1)
        timesteps = torch.tensor(per_draw * len(sequences), device=device)  # row j: draw j % n
        alpha = alphas[timesteps].view(-1, 1, 1, 1)
        signal, noise_scale = alpha.sqrt(), (1 - alpha).sqrt()
        noisy = (signal * target_latent + noise_scale * repeated).to(pipeline.unet.dtype)
        prediction = pipeline.unet(noisy, timesteps, encoder_hidden_states=hidden).sample.float()
        wanted = signal * repeated - noise_scale * target_latent if v_prediction else repeated
        return (prediction - wanted).pow(2).mean(dim=(1, 2, 3)).view(len(sequences), -1).mean(dim=1).tolist()


def denoising_loss(pipeline: Any, ids: list[int], target_latent: Any, timestep: int, noises: Any) -> float:
    """The attack's objective for one id sequence, averaged over given noise samples at one timestep
    (see :func:`candidate_losses`). Diagnostics and tests use it."""
    return candidate_losses(pipeline, [ids], target_latent, timestep, noises)[0]
