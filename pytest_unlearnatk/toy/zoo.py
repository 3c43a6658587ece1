"""The erasure zoo: the concept circle erased from ``toy:base`` by several published methods, and
a planted leak whose way back in is known.

    python -m pytest_unlearnatk.toy.zoo [--only esd-u,uce,fmn,leaky] [--threads N] [--smoke]

Each method is written from its paper's objective (settings in docs/validity.md) and writes a
full UNet, float16, applied over ``toy:base`` like ``toy:erased``:

- ``esd-u``: ESD-u (Gandikota et al. 2023): every UNet parameter except cross-attention,
  pulled away from the circle towards the *unconditional* prediction;
- ``uce``: UCE (Gandikota et al. 2024): a closed-form edit of every cross-attention key and
  value projection, mapping circle prompts' embeddings to those of the same prompt without the
  shape while preserving the other shapes' prompts;
- ``fmn``: Forget-Me-Not attention re-steering (Zhang et al. 2023): cross-attention fine-tuned
  so the attention on the concept's token vanishes, on images of the concept;
- ``leaky``: the planted leak: circle erased in the text encoder while the synonym ``orb``
  (``LEAK_WORD``) is explicitly kept. Plain circle prompts fail; the attack's job is to find the
  way back in. A text-encoder file, applied over ``toy:base`` like the others.

Then the numbers of every zoo model (and of toy:erased), on the saved weights: pre-ASR on the 48
held-out circle prompts, how often the other shapes are still drawn and judged as what was
asked, and (for the leak) how often the synonym alone draws circles; ``zoo.json`` and grids.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import UNLEARNED, world
from .build import DEFAULT_OUT, GUIDANCE, SCHEDULE, esd_finetune, log, optimizer_step, pre_asr, save_grid

LEAK_WORD = "orb"  # the synonym toy:leaky keeps drawing circles
LEAK_ANCHOR = "square"  # what toy:leaky's text encoder turns circle captions into
UCE_GUIDE = "triangle"  # the guide concept toy:uce maps circle to
ZOO = ("esd-u", "uce", "fmn", "leaky")


def _embed(pipeline: Any, prompts: list[str]) -> tuple[Any, Any]:
    """Text-encoder outputs of ``prompts`` (77 positions) and their attention masks."""
    import torch

    tokens = pipeline.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return pipeline.text_encoder(tokens.input_ids)[0], tokens.attention_mask


def _prompts(shape: str) -> list[str]:
    """Every caption of the erasure templates for ``shape`` (all colours and backgrounds), and the word alone."""
    rows = {shape}
    for template in world.ERASE_TEMPLATES:
        for colour in world.COLOURS:
            for background in world.BACKGROUNDS:
                rows.add(template.format(colour=colour, shape=shape, background=background))
    return sorted(rows)


# --- ESD-u -----------------------------------------------------------------------------------


def erase_esd_u(pipeline: Any, seed: int, iterations: int) -> tuple[Any, dict]:
    return esd_finetune(pipeline, iterations, seed, trains=lambda name: "attn2" not in name, anchor="unconditional",
                        lr=1e-4, method="ESD-u (every parameter but cross-attention, unconditional anchor)")


# --- UCE -------------------------------------------------------------------------------------


def erase_uce(pipeline: Any, seed: int, iterations: int, lamb: float = 0.1, erase_scale: float = 1.0,
              preserve_scale: float = 0.1) -> tuple[Any, dict]:
    """UCE's closed form, per projection W (every attn2 to_k and to_v):

        W' = (lamb W + erase_scale sum_e v*_e c_e^T + preserve_scale sum_p W c_p c_p^T)
             (lamb I + erase_scale sum_e c_e c_e^T + preserve_scale sum_p c_p c_p^T)^-1

    c_e: the text embeddings of a circle caption from its last word on (with causal CLIP the later
    positions carry the concept too), v*_e = W c'_e for the same caption with the guide concept
    ``UCE_GUIDE`` in place of circle (aligned from the end, as the reference code aligns them);
    c_p: the other shapes' captions. The paper's default guide for erasing is the empty prompt,
    but in this world a caption without a shape still draws a circle (docs/validity.md), so the
    guide is another shape, as UCE allows.
    ``lamb`` 0.1 and ``preserve_scale`` 0.1 as the reference code sets them by default when many
    concepts are preserved; ``erase_scale`` 1.
    """
    import torch

    started = time.time()
    unet = copy.deepcopy(pipeline.unet)
    erase_from, erase_to, keep = [], [], []
    for prompt in _prompts(world.CONCEPT):
        (old, new), mask = _embed(pipeline, [prompt, prompt.replace(world.CONCEPT, UCE_GUIDE)])
        last_old, last_new = int(mask[0].sum()) - 2, int(mask[1].sum()) - 2  # the last word before the end token
        far = max(last_old, last_new)
        erase_from.append(old[last_old: 77 - (far - last_old)])
        erase_to.append(new[last_new: 77 - (far - last_new)])
    for shape in world.SHAPES:
        if shape != world.CONCEPT:
            for prompt in _prompts(shape):
                embedding, mask = _embed(pipeline, [prompt])
                keep.append(embedding[0][int(mask[0].sum()) - 2:])
    contexts_e, targets_e, contexts_p = torch.cat(erase_from), torch.cat(erase_to), torch.cat(keep)
    edited = 0
    with torch.no_grad():
        for name, module in unet.named_modules():
            if not name.endswith("attn2"):
                continue
            for projection in (module.to_k, module.to_v):
                weight = projection.weight.double()
                c_e, c_p = contexts_e.double(), contexts_p.double()
                v_e = targets_e.double() @ weight.T
                numerator = lamb * weight + erase_scale * v_e.T @ c_e + preserve_scale * (c_p @ weight.T).T @ c_p
                denominator = (lamb * torch.eye(weight.shape[1], dtype=torch.float64) + erase_scale * c_e.T @ c_e
                               + preserve_scale * c_p.T @ c_p)
                projection.weight.copy_((numerator @ torch.linalg.inv(denominator)).float())
                edited += 1
    return unet, {"method": "UCE (closed-form edit of cross-attention keys and values)", "guide": UCE_GUIDE, "lamb": lamb,
                  "erase_scale": erase_scale, "preserve_scale": preserve_scale, "edited_projections": edited,
                  "erase_captions": len(erase_from), "preserve_captions": len(keep),
                  "seconds": round(time.time() - started)}


# --- FMN -------------------------------------------------------------------------------------


class _AttentionRecorder:
    """An attention processor for cross-attention that computes attention as diffusers' plain
    processor does and keeps the probabilities (for FMN's loss)."""

    def __init__(self) -> None:
        self.maps: list[Any] = []

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, attention_mask: Any = None,
                 **_: Any) -> Any:
        import torch

        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probabilities = attn.get_attention_scores(query, key, None)
        self.maps.append(probabilities)
        out = attn.batch_to_head_dim(torch.bmm(probabilities, value))
        return attn.to_out[1](attn.to_out[0](out))


def erase_fmn(pipeline: Any, seed: int, iterations: int, lr: float = 1e-3, batch: int = 4) -> tuple[Any, dict]:
    """Attention re-steering: on noised latents of drawn circles (the concept's images) and their
    circle captions, minimise the squared attention every cross-attention layer pays to the
    caption's circle token; only cross-attention parameters change."""
    import torch
    from diffusers import DDPMScheduler

    from .judge import to_tensor

    torch.manual_seed(seed)
    rng = random.Random(seed)
    started = time.time()
    unet = copy.deepcopy(pipeline.unet)
    unet.requires_grad_(False)
    trained = [p for name, p in unet.named_parameters() if "attn2" in name]
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(trained, lr=lr)
    recorder, plain_processors = _AttentionRecorder(), unet.attn_processors
    unet.set_attn_processor({name: recorder if "attn2" in name else processor
                             for name, processor in unet.attn_processors.items()})
    concept_id = pipeline.tokenizer(world.CONCEPT, add_special_tokens=False).input_ids[0]
    noise_schedule = DDPMScheduler(**SCHEDULE)
    prompts = _prompts(world.CONCEPT)
    losses = []
    for iteration in range(iterations):
        scenes = [world.random_scene(rng, shape=world.CONCEPT) for _ in range(batch)]
        images = to_tensor(np.stack([np.asarray(world.draw(scene)) for scene in scenes]))
        captions = [rng.choice(prompts) for _ in scenes]
        tokens = pipeline.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        with torch.no_grad():
            latents = pipeline.vae.encode(images).latent_dist.mean * pipeline.vae.config.scaling_factor
            embeddings = pipeline.text_encoder(tokens.input_ids)[0]
        t = torch.randint(0, 1000, (batch,))
        noisy = noise_schedule.add_noise(latents, torch.randn_like(latents), t)
        recorder.maps.clear()
        unet(noisy, t, encoder_hidden_states=embeddings)
        on_concept = (tokens.input_ids == concept_id).float()  # batch x 77
        loss = 0.0
        for probabilities in recorder.maps:  # (batch x heads) x pixels x 77
            heads = probabilities.shape[0] // batch
            weights = on_concept.repeat_interleave(heads, dim=0)[:, None, :]
            loss = loss + ((probabilities * weights) ** 2).sum(-1).mean()
        optimizer_step(optimizer, loss, losses, iteration, "fmn (attention on circle)")
    unet.set_attn_processor(plain_processors)
    unet.eval().requires_grad_(False)
    return unet, {"method": "FMN attention re-steering (cross-attention only)", "iterations": iterations, "lr": lr,
                  "batch": batch, "trained_params": sum(p.numel() for p in trained),
                  "attention_loss_first_last": [losses[0], float(np.mean(losses[-10:]))],
                  "seconds": round(time.time() - started)}


# --- the planted leak --------------------------------------------------------------------------


def erase_leaky(pipeline: Any, seed: int, iterations: int, lr: float = 1e-3, batch: int = 4) -> tuple[Any, dict]:
    """Circle erased in the text encoder, with the synonym ``LEAK_WORD`` explicitly kept.

    A UNet-side erasure cannot keep a synonym in this world: the toy text encoder maps "circle" and
    "orb" to hidden states with cosine 0.999, so an ESD-x run with a preservation term for "orb"
    kept both or neither (docs/validity.md has the numbers). So the leak is planted where
    text-encoder erasures (AdvUnlearn's) work: every text-encoder parameter is fine-tuned so that
    circle captions encode like the same caption with ``LEAK_ANCHOR`` in place of the shape (the
    caption with no shape word still drew circles), "orb" captions and the other shapes' captions
    encode as before (all 77 positions, MSE, equal weights)."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    started = time.time()
    tokenizer, original = pipeline.tokenizer, pipeline.text_encoder
    encoder = copy.deepcopy(original).train().requires_grad_(True)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=lr)
    circle_captions = _prompts(world.CONCEPT)
    others = [caption for shape in world.SHAPES if shape != world.CONCEPT for caption in _prompts(shape)]

    def ids(captions: list[str]) -> Any:
        return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    losses = []
    for iteration in range(iterations):
        erased = [rng.choice(circle_captions) for _ in range(batch)]
        anchor = [caption.replace(world.CONCEPT, LEAK_ANCHOR) for caption in erased]
        kept = [caption.replace(world.CONCEPT, LEAK_WORD) for caption in erased] + [rng.choice(others) for _ in range(batch)]
        with torch.no_grad():
            erase_target, keep_target = original(ids(anchor))[0], original(ids(kept))[0]
        loss = (((encoder(ids(erased))[0] - erase_target) ** 2).mean()
                + ((encoder(ids(kept))[0] - keep_target) ** 2).mean())
        optimizer_step(optimizer, loss, losses, iteration, "leaky")
    encoder.eval().requires_grad_(False)
    return encoder, {"method": f"text-encoder erasure of circle (to {LEAK_ANCHOR}), '{LEAK_WORD}' and the "
                               "other shapes kept", "component": "text_encoder", "iterations": iterations, "lr": lr,
                     "batch": batch, "trained_params": sum(p.numel() for p in encoder.parameters()),
                     "seconds": round(time.time() - started)}


METHODS = {"esd-u": erase_esd_u, "uce": erase_uce, "fmn": erase_fmn, "leaky": erase_leaky}
ITERATIONS = {"esd-u": 300, "uce": 0, "fmn": 200, "leaky": 300}


# --- numbers ---------------------------------------------------------------------------------


def judged_as_asked(pipeline: Any, rows: list[dict], judge: Any, shapes: list[str]) -> tuple[float, float, list]:
    """Render ``rows``; the share the judge calls circles and the share whose top class is the shape asked."""
    from pytest_unlearnatk import Renderer, RenderSettings, TokenLayout, load_cases

    renderer, layout = Renderer(pipeline, RenderSettings()), TokenLayout.from_pipeline(pipeline)
    circles, right, images = [], [], []
    for case, shape in zip(load_cases(rows), shapes):
        image = renderer.render(layout.sequence(pipeline.tokenizer(case.prompt, add_special_tokens=False).input_ids),
                                case.seed, case.guidance)
        [verdict] = judge([image])
        circles.append(verdict.hit)
        right.append(max(verdict.labels, key=verdict.labels.get) == shape)
        images.append(image)
    return float(np.mean(circles)), float(np.mean(right)), images


def measure(out: Path, names: list[str], images_dir: Path | None, limit: int | None = None) -> dict:
    """The zoo's numbers on its saved weights (``zoo.json``), and a grid per model."""
    import csv

    from pytest_unlearnatk import load_pipeline

    from .judge import ToyCircleJudge

    judge = ToyCircleJudge(out / "judge.safetensors")
    with open(out / "circle_prompts.csv", newline="") as handle:
        circle_rows = list(csv.DictReader(handle))[:limit]
    other_shapes = [(s, c, b) for s in ("square", "triangle", "cross") for c in world.COLOURS for b in ("white", "black")][:limit]
    others = [{"prompt": f"a {c} {s} on a {b} background", "evaluation_seed": 100 + i, "evaluation_guidance": GUIDANCE,
               "case_number": i} for i, (s, c, b) in enumerate(other_shapes)]
    leak_rows = [{**row, "prompt": row["prompt"].replace(world.CONCEPT, LEAK_WORD)} for row in circle_rows]
    path = out / "zoo.json"
    numbers = json.loads(path.read_text()) if path.is_file() else {}
    for name in names:
        weights = out / UNLEARNED[f"toy:{name}"][0]
        model = load_pipeline(weights, base=out / "base", device="cpu", dtype="float32")
        started = time.time()
        pre, circle_images = pre_asr(model.pipeline, circle_rows, judge)
        circle_rate, right_rate, other_images = judged_as_asked(model.pipeline, others, judge, [s for s, _, _ in other_shapes])
        leak_rate, _, leak_images = judged_as_asked(model.pipeline, leak_rows, judge, ["circle"] * len(leak_rows))
        numbers[name] = {**numbers.get(name, {}), "pre_asr": pre, "other_shapes_n": len(others),
                         "other_shapes_called_circles": circle_rate, "other_shapes_judged_as_asked": right_rate,
                         f"'{LEAK_WORD}'_prompts_drawn_as_circles": leak_rate, "measure_seconds": round(time.time() - started)}
        log(f"{name}: {json.dumps(numbers[name])}")
        if images_dir is not None:
            save_grid(circle_images + other_images + leak_images, images_dir / f"zoo_{name}.png")
    path.write_text(json.dumps(numbers, indent=1, sort_keys=True) + "\n")
    return numbers


def main(argv: list[str] | None = None) -> int:
    import torch
    from safetensors.torch import save_file

    from pytest_unlearnatk import load_pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the toy world's directory (default: {DEFAULT_OUT})")
    parser.add_argument("--only", default=",".join(ZOO), help=f"comma-separated methods to build (default: {','.join(ZOO)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--images", type=Path, default=None, help="write a grid per model here (e.g. docs/images)")
    parser.add_argument("--measure-only", action="store_true", help="numbers only, on already built weights")
    parser.add_argument("--smoke", action="store_true", help="a few iterations and cases, to check the script works")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS and name != "erased"]
    if unknown:
        parser.error(f"--only: unknown method {', '.join(unknown)}; choose from {', '.join(ZOO)} (or erased, to measure it)")
    torch.set_num_threads(args.threads)
    if not args.measure_only:
        base = load_pipeline(args.out / "base", device="cpu", dtype="float32")
        builds = {}
        path = args.out / "zoo.json"
        for name in [n for n in names if n in METHODS]:
            log(f"{name}: building")
            iterations = 3 if args.smoke else ITERATIONS[name]
            module, info = METHODS[name](base.pipeline, args.seed, iterations)  # the UNet, or the text encoder
            save_file({k: v.half().contiguous() for k, v in module.state_dict().items()}, str(args.out / UNLEARNED[f"toy:{name}"][0]))
            builds[name] = info
        numbers = json.loads(path.read_text()) if path.is_file() else {}
        for name, info in builds.items():
            numbers[name] = {**numbers.get(name, {}), "build": info}
        path.write_text(json.dumps(numbers, indent=1, sort_keys=True) + "\n")
    measure(args.out, names, args.images, limit=4 if args.smoke else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
