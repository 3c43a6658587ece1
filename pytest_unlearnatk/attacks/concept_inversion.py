"""Concept inversion (Pham et al., ICLR 2024, "Circumventing Concept Erasure Methods for
Text-to-Image Generative Models"): textual inversion through the unlearned model itself.

One new token embedding per case is learned with the standard denoising loss on the case's
target image (noised at a random timestep, fresh noise each step), through the unlearned model's
own text encoder and UNet: the continuous word that makes the unlearned model draw the target.
The paper replaces the concept's word in its prompts by the learned pseudo-word; we put the
pseudo-word in front of the case's prompt (the first free token slot, as UnlearnDiffAtk's
tokens), so no word of the prompt has to be recognised as the concept's. It starts from the
embedding of ``init_word`` (default: the gate's concept's first token, as the paper starts from
a word of the concept, "art" for styles). Every ``check_every`` steps the prompt with the
current embedding injected is rendered and judged; the first hit ends the case.

The result is an embedding, not a text anyone could type: its ASR is a white-box upper bound on
what prompts can do, and is labelled so wherever it is shown. A hit's embedding is kept in the
store as a safetensors file named by its SHA-256, and the stored prompt names it, so it replays.

Cases are batched like UnlearnDiffAtk's and P4D's (:mod:`.batching`): up to ``batch_size`` cases
at once, each step one text-encoder and one UNet call for all of them, each case in the row of its
place (the calls shrink to the places still taken once no case is left for a place; a place a
reused case holds gets a copy of a live case, whose outputs are dropped), one MSE per row, summed
for the backward pass so each case's gradient is its own. The checks of the cases whose check
point came at this step are rendered together, each in its row with its own case's embedding injected
(the renderer encodes only the conditional rows; its negative embedding is computed once, alone),
then judged one by one. Each case keeps its own
generator (each step's timestep, then its noise), embedding, AdamW state and check schedule, so
its embedding and verdict do not depend on which cases share its batch (tests/test_attacks_more.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ..cases import Case
from ..checks import finite, text, whole
from ..errors import UnlearnAtkError
from ..results import CandidateCheck
from ..tokens import FittedPrompt
from .base import AttackContext, AttackJob, AttackOutcome, StepCallback
from .batching import PlacedBatch, case_memory_bytes, finite_losses
from .unlearndiffatk import EmbeddingInjector, encode_target

INVERTED = "<inverted>"  # how the pseudo-word is written in texts and reports


@dataclass(frozen=True)
class ConceptInversionConfig:
    """The defaults follow the reference code's textual-inversion run (``reference``)."""

    steps: int = 5000  # optimization steps (max_train_steps)
    # 5e-3 times the batch (--scale_lr: 0.08 at the reference's batch 4 x accumulation 4; ours is one
    # target image, so 5e-3: at 0.08 the toy runs overshot, docs/attacks.md), constant
    lr: float = 0.005
    weight_decay: float = 0.01  # AdamW, as in diffusers' textual-inversion script
    check_every: int = 100  # render and judge the prompt with the current embedding this often (50 checks,
    # as UnlearnDiffAtk's reference budget has; the paper renders once, after training)
    init_word: str = ""  # the embedding starts at this word's first token; "": the gate's concept's
    seed: int = 0  # mixed with the case's seed (timesteps and noise)

    def __post_init__(self) -> None:
        whole(self.steps, "concept-inversion steps", 1, 1_000_000)
        whole(self.check_every, "concept-inversion check_every", 1, 1_000_000)
        whole(self.seed, "concept-inversion seed", 0, 2**31)
        if finite(self.lr, "concept-inversion lr", 0) == 0:
            raise UnlearnAtkError("concept-inversion lr is 0; it must be positive")
        finite(self.weight_decay, "concept-inversion weight_decay", 0)
        text(self.init_word, "concept-inversion init_word")

    def check_points(self) -> list[int]:
        return sorted({*range(self.check_every, self.steps + 1, self.check_every), self.steps})


PRESETS = {
    "reference": ConceptInversionConfig(),
    # a twelfth of the steps, checked 10 times (as UnlearnDiffAtk's fast budget)
    "fast": ConceptInversionConfig(steps=400, check_every=40),
    # every code path, for tests: 6 steps, checked twice
    "smoke": ConceptInversionConfig(steps=6, check_every=3),
}


class ConceptInversion:
    name = "concept-inversion"
    config_class = ConceptInversionConfig
    presets = PRESETS
    default_preset = "reference"
    requires = ("torch", "diffusers", "transformers", "safetensors")
    needs_target = True
    n_adversarial = 1  # the pseudo-word's slot
    white_box_bound = True  # its candidates are embeddings, not texts: the ASR bounds prompts from above

    def __init__(self, config: ConceptInversionConfig | None = None) -> None:
        self.config = config or PRESETS["reference"]

    def config_dict(self) -> dict[str, Any]:
        # "version" changes whenever the same settings would learn another embedding (it is part of
        # the store key): 2 = cases batched at the batch's full shape, one loss per row, checks
        # rendered in batches of the batch size (both round differently from version 1's one case);
        # 3 = each case runs and is rendered in the row of its place (case index % batch size), and
        # each image is decoded alone (rows round differently: see .batching); 4 = a free place takes
        # the next case in order, and once none is left the calls shrink to the places still taken
        return {**asdict(self.config), "version": 4}

    def start_token(self, pipeline: Any, concept: str) -> int:
        word = self.config.init_word or concept
        ids = pipeline.tokenizer(word, add_special_tokens=False).input_ids if word else []
        if not ids:
            raise UnlearnAtkError("concept-inversion: no init_word and no concept to start the embedding from; "
                                  "give init_word= (a word of the concept)")
        return ids[0]

    def run(self, case: Case, prompt: FittedPrompt, context: AttackContext,
            on_step: StepCallback | None = None) -> AttackOutcome:
        """Attack one case (a batch of one)."""
        [(_, outcome)] = self.run_many([AttackJob(case, prompt, context)], batch_size=1, on_step=on_step)
        return outcome

    def run_many(self, jobs: Iterable[AttackJob], batch_size: int | str | None = None,
                 on_step: StepCallback | None = None, compile_unet: bool = False,
                 case_count: int | None = None) -> Iterator[tuple[AttackJob, AttackOutcome]]:
        """Attack the jobs' cases, up to ``batch_size`` at once; yield each case as it finishes.

        As UnlearnDiffAtk's and P4D's ``run_many`` (see :mod:`.batching`): each step runs the text
        encoder and the UNet once for the whole batch, each case in the row of its place (see
        :mod:`.batching` for the rows and shapes of the calls); the checks of the cases whose check
        point came are rendered together, each in its row with its own embedding injected, then
        judged one by one. Each case keeps its own
        generator, embedding, AdamW state and check schedule, so its embedding and verdict do not
        depend on which cases share its batch. ``batch_size``: a number, or ``"auto"`` (decided on
        the model's device and size, as UnlearnDiffAtk's). ``compile_unet`` is ignored.
        ``case_count``: the gate's number of cases, a cap on the batch.
        """
        yield from _InversionBatch(self, iter(jobs), batch_size, on_step, case_count).run()


@dataclass
class _InversionSlot:
    """One case in the batch: its ids, target, generator, learned embedding and optimizer."""

    job: AttackJob
    placeholder: int  # the token the embedding starts from; its id stands in the sequence
    ids: list[int]  # the id sequence the text encoder reads (the embedding is injected at position 1)
    target_latent: Any  # (1, C, H, W)
    generator: Any  # the case's own: each step's timestep, then its noise
    learned: Any  # (1, width) float32: the learned embedding
    optimizer: Any  # AdamW on ``learned``
    outcome: AttackOutcome = field(default_factory=lambda: AttackOutcome(embedding_positions=[1]))
    step_in_block: int = 0
    timestep: int = 0  # the last step's
    block_losses: list[Any] = field(default_factory=list)
    place: int = 0  # its row in the batch's model calls (set by the loop)


class _InversionBatch(PlacedBatch):
    """Concept inversion's optimization loop over a changing batch of cases (see ``run_many``)."""

    def __init__(self, attack: ConceptInversion, jobs: Iterator[AttackJob], batch_size: int | str | None,
                 on_step: StepCallback | None, case_count: int | None = None) -> None:
        super().__init__(jobs, batch_size, on_step, case_count)
        self.attack, self.config = attack, attack.config
        self.max_steps = attack.config.steps
        self.checkpoints = set(attack.config.check_points())

    def _setup(self, context: AttackContext) -> None:
        import torch

        from ..render import noise_schedule

        pipeline = self.pipeline = context.model.pipeline
        for module in (pipeline.text_encoder, pipeline.unet, pipeline.vae):
            module.requires_grad_(False).eval()
        self.device = pipeline.device
        self.alphas = noise_schedule(pipeline).to(device=self.device, dtype=torch.float32)
        self.v_prediction = pipeline.scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
        self.table = pipeline.text_encoder.get_input_embeddings().weight
        # one pseudo-word per sequence, at position 1 (after BOS); embeddings (rows, 1, width), one per row
        self.injector = EmbeddingInjector(pipeline.text_encoder, [1])
        self._resolve_batch(self.device, case_memory_bytes(pipeline.unet.config, pipeline.unet.dtype.itemsize))

    def _new_slot(self, job: AttackJob) -> _InversionSlot:
        import torch

        case, prompt, context, config = job.case, job.prompt, job.context, self.config
        if context.target is None:
            raise UnlearnAtkError("concept-inversion needs target images: give a base model (base=, --unlearn-base) "
                                  "or a target directory")
        layout = context.layout
        plain_ids = layout.sequence(prompt.content_ids)
        target_latent = encode_target(self.pipeline, context.target(case, plain_ids))
        placeholder = self.attack.start_token(self.pipeline, context.concept)
        learned = self.table[placeholder].detach().float().clone().unsqueeze(0).requires_grad_(True)  # (1, width)
        return _InversionSlot(
            job=job, placeholder=placeholder, ids=layout.sequence(prompt.content_ids, [placeholder]),
            target_latent=target_latent,
            generator=torch.Generator(device="cpu").manual_seed(config.seed * 1_000_003 + case.seed),
            learned=learned, optimizer=torch.optim.AdamW([learned], lr=config.lr, weight_decay=config.weight_decay))

    def _joined(self, added: int) -> None:
        self._restack()

    def _rows_changed(self) -> None:
        self._restack()

    def _left(self, keep: list[int]) -> None:
        self._restack()

    def _restack(self) -> None:
        """The text encoder's ids, one per row of the calls."""
        import torch

        if self.slots:
            self.ids = torch.tensor([slot.ids for slot in self.padded(self.slots)], device=self.device)

    def _enter(self, stack: contextlib.ExitStack) -> None:
        stack.enter_context(self.injector.active())

    def _block_ended(self, slot: _InversionSlot) -> bool:
        return slot.outcome.steps in self.checkpoints

    def _step(self) -> None:
        """One AdamW step on every case's embedding: the denoising loss on its target."""
        import torch

        slots, device = self.slots, self.device
        noisy, wanted, timesteps = [], [], []
        for slot in slots:  # each case's draws from its own generator, in the order of a case alone
            t = int(torch.randint(0, len(self.alphas), (1,), generator=slot.generator))
            noise = torch.randn(slot.target_latent.shape, generator=slot.generator).to(device)
            a, latent = self.alphas[t], slot.target_latent
            noisy.append(a.sqrt() * latent + (1 - a).sqrt() * noise)
            wanted.append(a.sqrt() * noise - (1 - a).sqrt() * latent if self.v_prediction else noise)
            timesteps.append(t)
            slot.timestep = t
        learned = [slot.learned for slot in slots]
        # (rows, 1, width), each case in the row of its place; a filler row's copy: outside the gradient
        self.injector.embeddings = self.padded_rows([embedding.unsqueeze(0) for embedding in learned])
        hidden = self.pipeline.text_encoder(self.ids)[0]
        self.injector.embeddings = None
        unet = self.pipeline.unet
        prediction = unet(torch.cat(self.padded(noisy)).to(unet.dtype), torch.tensor(self.padded(timesteps), device=device),
                          encoder_hidden_states=hidden).sample.float()
        losses = self.per_case((prediction - torch.cat(self.padded(wanted))).pow(2).mean(dim=(1, 2, 3)))  # one MSE per case
        grads = torch.autograd.grad(losses.sum(), learned)  # the sum keeps each case's gradient its own
        for slot, grad, loss in zip(slots, grads, losses.detach()):
            slot.learned.grad = grad
            slot.optimizer.step()
            slot.optimizer.zero_grad(set_to_none=True)
            slot.block_losses.append(loss)

    def _end_blocks(self, ended: list[int]) -> list[int]:
        """Check the embeddings of the cases whose check point came; return the finished ones."""
        import torch

        requests, embeddings = [], []
        for i in ended:
            slot = self.slots[i]
            outcome = slot.outcome
            outcome.loss_trace.extend(finite_losses(slot.block_losses, self.attack.name, slot.job.case, outcome.steps))
            slot.block_losses, slot.step_in_block = [], 0
            embeddings.append(slot.learned.detach().clone())
            requests.append((slot.job.context.check, slot.ids))

        @contextlib.contextmanager
        def injected(rows: list[int]) -> Iterator[None]:
            """Each row of a check's render gets its own case's embedding (the text encoder reads
            only the conditional rows: the renderer's negative embedding is computed once, alone)."""
            self.injector.embeddings = torch.stack([embeddings[row] for row in rows])  # (rows, 1, width)
            try:
                yield
            finally:
                self.injector.embeddings = None

        checked = self.check_many(requests, ended, around=injected)
        for i, embedding, (verdict, image) in zip(ended, embeddings, checked):
            slot = self.slots[i]
            outcome = slot.outcome
            outcome.checks.append(CandidateCheck(outcome.steps, slot.timestep, [slot.placeholder], rendered=True,
                                                 hit=verdict.hit, score=verdict.score))
            outcome.adversarial_ids, outcome.embedding = [slot.placeholder], embedding.cpu()
            outcome.verdict, outcome.image = verdict, image
            if verdict.hit:
                outcome.hit, outcome.hit_step = True, outcome.steps
        return [i for i in ended if self.slots[i].outcome.hit or self.slots[i].outcome.steps == self.config.steps]


def embedding_bytes(embedding: Any, positions: list[int]) -> bytes:
    """The safetensors file of an injected embedding (float32, CPU) and the positions it takes.

    Written here, not by safetensors' ``save``: that writes the metadata's keys in a random order
    (a Rust hash map), so the same embedding gave one of two files, and two names in the store.
    Here the same embedding and positions always give the same bytes."""
    import json
    import struct

    tensor = embedding.detach().float().cpu().contiguous()
    data = tensor.numpy().astype("<f4").tobytes()
    header = {"__metadata__": {"kind": "pytest-unlearnatk injected embedding", "positions": json.dumps(list(positions))},
              "embedding": {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [0, len(data)]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensor data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text + data


def load_embedding(data: bytes) -> tuple[Any, list[int]]:
    """The embedding and its positions back from :func:`embedding_bytes`' file."""
    import json
    import struct

    from safetensors.torch import load

    header_size = struct.unpack("<Q", data[:8])[0]  # safetensors: an 8-byte length, then a JSON header
    metadata = json.loads(data[8: 8 + header_size]).get("__metadata__") or {}
    return load(data)["embedding"], [int(p) for p in json.loads(metadata.get("positions", "[1]"))]
