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
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from ..cases import Case
from ..checks import finite, text, whole
from ..errors import UnlearnAtkError
from ..results import CandidateCheck
from ..tokens import FittedPrompt
from .base import AttackContext, AttackOutcome, CaseByCase, StepCallback
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


class ConceptInversion(CaseByCase):
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
        return {**asdict(self.config), "version": 1}

    def start_token(self, pipeline: Any, concept: str) -> int:
        word = self.config.init_word or concept
        ids = pipeline.tokenizer(word, add_special_tokens=False).input_ids if word else []
        if not ids:
            raise UnlearnAtkError("concept-inversion: no init_word and no concept to start the embedding from; "
                                  "give init_word= (a word of the concept)")
        return ids[0]

    def run(self, case: Case, prompt: FittedPrompt, context: AttackContext,
            on_step: StepCallback | None = None) -> AttackOutcome:
        import torch

        from ..render import noise_schedule

        config, layout = self.config, context.layout
        if context.target is None:
            raise UnlearnAtkError("concept-inversion needs target images: give a base model (base=, --unlearn-base) "
                                  "or a target directory")
        pipeline = context.model.pipeline
        for module in (pipeline.text_encoder, pipeline.unet, pipeline.vae):
            module.requires_grad_(False).eval()
        device = pipeline.device
        plain_ids = layout.sequence(prompt.content_ids)
        target_latent = encode_target(pipeline, context.target(case, plain_ids))
        started = time.perf_counter()
        placeholder = self.start_token(pipeline, context.concept)
        ids = layout.sequence(prompt.content_ids, [placeholder])
        id_tensor = torch.tensor([ids], device=device)
        table = pipeline.text_encoder.get_input_embeddings().weight
        learned = table[placeholder].detach().float().clone().unsqueeze(0).requires_grad_(True)  # (1, width)
        optimizer = torch.optim.AdamW([learned], lr=config.lr, weight_decay=config.weight_decay)
        alphas = noise_schedule(pipeline).to(device=device, dtype=torch.float32)
        v_prediction = pipeline.scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
        generator = torch.Generator(device="cpu").manual_seed(config.seed * 1_000_003 + case.seed)
        injector = EmbeddingInjector(pipeline.text_encoder, [1])
        checkpoints = set(config.check_points())
        outcome = AttackOutcome(embedding_positions=[1])
        with injector.active():
            for step in range(1, config.steps + 1):
                t = int(torch.randint(0, len(alphas), (1,), generator=generator))
                noise = torch.randn(target_latent.shape, generator=generator).to(device)
                a = alphas[t]
                noisy = a.sqrt() * target_latent + (1 - a).sqrt() * noise
                injector.embeddings = learned
                hidden = pipeline.text_encoder(id_tensor)[0]
                injector.embeddings = None
                prediction = pipeline.unet(noisy.to(pipeline.unet.dtype), torch.tensor([t], device=device),
                                           encoder_hidden_states=hidden).sample.float()
                wanted = a.sqrt() * noise - (1 - a).sqrt() * target_latent if v_prediction else noise
                loss = torch.nn.functional.mse_loss(prediction, wanted)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                outcome.loss_trace.append(loss.item())
                outcome.steps = step
                if on_step is not None:
                    on_step([(case, step, config.steps)])
                if step not in checkpoints:
                    continue
                outcome.optimize_seconds += time.perf_counter() - started
                embedding = learned.detach().clone()
                injector.embeddings = embedding  # the check's render encodes through the same text encoder
                try:
                    verdict, image = context.check(ids)
                finally:
                    injector.embeddings = None
                outcome.checks.append(CandidateCheck(step, t, [placeholder], rendered=True, hit=verdict.hit,
                                                     score=verdict.score))
                outcome.adversarial_ids, outcome.embedding = [placeholder], embedding.cpu()
                outcome.verdict, outcome.image = verdict, image
                if verdict.hit:
                    outcome.hit, outcome.hit_step = True, step
                    return outcome
                started = time.perf_counter()
        return outcome


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
