"""Our UnlearnDiffAtk next to a port of the authors' attack loop, on the same cases.

    python benchmarks/vs_reference.py [--quick] [--model leaky] [--first 0] [--cases 24] [--blocks 50] [--steps 40]
        [--seed 0] [--port-renders-ids] [--check-text] [--candidates-per-check 1] [--position-choices 1] [--ours-only]

The port (class ``ReferenceLoop``) is our own code written to keep the semantics of the
reference implementation (OPTML-Group/Diffusion-MU-Attack, ``TextGrad`` with the classifier
task): one case at a time; k token distributions on the simplex, uniform at the start; each step
draws one token per slot with ``torch.multinomial`` (straight-through gradient, clipped to
[-1, 1]); Adam (lr 0.01, weight decay 0.1); a per-row bisection projection back onto the simplex
to 1e-5; the loss is the MSE between the unlearned UNet's noise prediction for the target's
latent noised at t and that noise, drawn from the *global* torch RNG, which every check re-seeds
with the case's seed, so each block of steps replays the same noise; t runs 10, 30, ..., 990
with ``--steps`` steps each; after each block the argmax tokens are decoded to text,
re-tokenized, and rendered with a default LMS scheduler (linspace spacing, 50 steps), with the
two UNet calls of classifier-free guidance.

Ours runs the ``reference`` budget of the ``unlearndiffatk`` attack in batches (``--batch``).
Both use the same model, cases, target images (``toy:base``, cached) and judge (``toy_circle``).
Prints hits/n with Wilson 95% intervals, seconds per case, and the time ratio.
``--blocks N --steps S`` runs both at another budget (``--blocks 10 --steps 20`` is ``fast``'s
optimization; add ``--position-choices 5`` for ours to be the whole ``fast`` preset, which refines
its candidates since 2026-12-04): N timesteps spread over the schedule as our config spreads them
(at 50, the reference's own sweep).
``--first F --cases N`` takes cases F to F+N-1 of ``toy:circle``; ``--seed S`` sets the attack seed of both
loops (for the port, a seed other than 0 re-seeds the global RNG after every check, so each block
still replays the same draws); ``--port-renders-ids`` makes the port check the ids it optimized
instead of its decoded text tokenized again; ``--check-text`` runs ours with ``check_text`` (it
also judges the ids a missed candidate's text tokenizes to); ``--candidates-per-check N`` runs ours
with ``candidates_per_check`` (it checks the lowest-loss of N argmax candidates per block);
``--position-choices M`` runs ours with ``position_choices`` (each position of a block's candidate
may take whichever of its M most probable tokens lowers the loss); ``--ours-only`` skips the port.
``--quick``: 2 cases, 3 blocks of 10 steps (a sanity check, not a comparison).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, positive_int, run_script, summary


def bisection_projection(row: Any, xi: float = 1e-5) -> Any:
    """The row projected onto the probability simplex: clip(row - mu, 0, 1) with mu found by
    bisection until the bracket is narrower than ``xi`` (the reference's per-row loop)."""
    import torch

    clipped = torch.clip(row, 0, 1)
    if abs(float(clipped.sum()) - 1.0) <= xi:
        return clipped
    low, high = float((row - 1).min()), float(row.max())
    middle = (low + high) / 2
    while abs(high - low) > xi:
        middle = (low + high) / 2
        at_middle = float(torch.clip(row - middle, 0, 1).sum()) - 1.0
        at_low = float(torch.clip(row - low, 0, 1).sum()) - 1.0 + 1e-8
        at_high = float(torch.clip(row - high, 0, 1).sum()) - 1.0
        if at_middle == 0:
            break
        if at_low == 0:
            middle = low
            break
        if at_high == 0:
            middle = high
            break
        if at_middle * at_low < 0:
            high = middle
        else:
            low = middle
    return torch.clip(row - middle, 0, 1)


class ReferenceLoop:
    """The reference attack loop on one diffusers pipeline (see the module docstring)."""

    def __init__(self, pipeline: Any, judge: Any, k: int = 5, timesteps: list[int] | None = None, steps: int = 40,
                 render_steps: int = 50, seed: int = 0, render_ids: bool = False) -> None:
        from diffusers import LMSDiscreteScheduler

        self.pipeline, self.judge, self.k, self.steps, self.render_steps = pipeline, judge, k, steps, render_steps
        # seed 0: the reference's own RNG use; another seed re-seeds the global RNG after every check
        # (so each block still replays the same draws, other ones). render_ids: check the optimized
        # ids as they are, not the decoded text tokenized again (an experiment, not the reference)
        self.seed, self.render_ids = seed, render_ids
        self.tokenizer, self.text_encoder, self.unet, self.vae = (pipeline.tokenizer, pipeline.text_encoder,
                                                                 pipeline.unet, pipeline.vae)
        self.table = self.text_encoder.get_input_embeddings().weight.detach()
        self.scheduler = LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                              num_train_timesteps=1000)  # the reference's own, not the model's
        # the reference sweeps 10, 30, ..., 990; at another budget, the timesteps ours sweeps
        self.timesteps = timesteps or list(range(10, 1000, 20))
        self.eos = self.tokenizer.eos_token_id
        self.latent_size = self.unet.config.sample_size
        for module in (self.text_encoder, self.unet, self.vae):
            module.requires_grad_(False)
        self.renders = 0

    def ids(self, text: str) -> Any:
        return self.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    def encode(self, ids: Any, adversarial: Any = None) -> Any:
        """Hidden states of ``ids``; ``adversarial`` (k x width) replaces the embeddings at 1..k."""
        from pytest_unlearnatk.attacks.unlearndiffatk import EmbeddingInjector

        injector = EmbeddingInjector(self.text_encoder, list(range(1, self.k + 1)))
        with injector.active():
            injector.embeddings = adversarial
            return self.text_encoder(ids)[0]

    def render(self, prompt: str | Any, seed: int, guidance: float) -> Any:
        """The reference's check: the text tokenized again (or given ids), LMS sampling from the global RNG seeded with ``seed``."""
        import torch
        from PIL import Image

        ids = self.ids(prompt) if isinstance(prompt, str) else prompt
        with torch.no_grad():
            conditional, unconditional = self.encode(ids), self.encode(self.ids(""))
            torch.manual_seed(seed)
            latents = torch.randn((1, self.unet.config.in_channels, self.latent_size, self.latent_size))
            self.scheduler.set_timesteps(self.render_steps)
            latents = latents * self.scheduler.init_noise_sigma
            for t in self.scheduler.timesteps:
                scaled = self.scheduler.scale_model_input(latents, t)
                plain = self.unet(scaled, t, encoder_hidden_states=unconditional).sample
                prompted = self.unet(scaled, t, encoder_hidden_states=conditional).sample
                latents = self.scheduler.step(plain + guidance * (prompted - plain), t, latents).prev_sample
            image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        self.renders += 1
        pixels = ((image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        return Image.fromarray(pixels)

    def check(self, prompt: str | Any, seed: int, guidance: float) -> bool:
        hit = bool(self.judge([self.render(prompt, seed, guidance)])[0].hit)
        if self.seed:
            import torch

            torch.manual_seed(self.seed * 1_000_003 + seed)
        return hit

    def attack(self, case: Any, target: Any) -> dict[str, Any]:
        import numpy as np
        import torch

        if self.check(case.prompt, case.seed, case.guidance):
            return {"hit": True, "by": "plain", "step": 0}
        ids = self.ids(case.prompt)
        length = int((ids[0] == self.eos).nonzero()[0]) - 1  # prompt tokens between start and end
        # the prompt moved right by k: start, k adversarial slots, the prompt, then end/padding
        shifted = torch.cat([ids[:, :1], ids[:, :1].repeat(1, self.k), ids[:, 1:1 + length], ids[:, 1 + length: 77 - self.k]], dim=1)
        pixels = torch.from_numpy(np.asarray(target.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            x0 = self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor
        vocabulary = self.table.shape[0]
        probabilities = torch.full((self.k, vocabulary), 1.0 / vocabulary, requires_grad=True)
        optimizer = torch.optim.Adam([probabilities], lr=0.01, weight_decay=0.1)
        alphas = self.scheduler.alphas_cumprod
        step = 0
        for t in self.timesteps:
            for _ in range(self.steps):
                optimizer.zero_grad()
                sampled = torch.multinomial(probabilities.detach(), 1).view(-1)
                one_hot = torch.nn.functional.one_hot(sampled, vocabulary).float()
                # straight-through: the forward uses the sampled one-hot, the gradient reaches the probabilities
                relaxed = one_hot + probabilities - probabilities.detach()
                adversarial = relaxed @ self.table
                noise = torch.randn((1, 4, self.latent_size, self.latent_size))
                noised = x0 * alphas[t] ** 0.5 + noise * (1 - alphas[t]) ** 0.5
                prediction = self.unet(noised, t, encoder_hidden_states=self.encode(shifted, adversarial)).sample
                loss = torch.nn.functional.mse_loss(prediction, noise)
                gradient = torch.autograd.grad(loss, [probabilities])[0]
                probabilities.grad = torch.nn.functional.hardtanh(gradient)
                optimizer.step()
                with torch.no_grad():
                    probabilities.data = torch.stack([bisection_projection(row) for row in probabilities])
                step += 1
            chosen = probabilities.detach().argmax(-1)
            full = torch.cat([ids[:, :1], chosen[None], ids[:, 1:1 + length], ids[:, 1 + length: 77 - self.k]], dim=1)
            text = self.tokenizer.decode([i for i in full[0, 1:].tolist() if i != self.eos])
            if self.check(full if self.render_ids else text, case.seed, case.guidance):
                return {"hit": True, "by": "attack", "step": step, "text": text}
        return {"hit": False, "by": None, "step": step}


def asr_line(name: str, hits: int, n: int, seconds: float) -> str:
    """``name: hits/n = ASR (95% CI low-high), seconds s/case``."""
    from pytest_unlearnatk.report import wilson_interval

    low, high = wilson_interval(hits, n)
    return f"{name}: {hits}/{n} = {hits / n:.1%} (95% CI {low:.0%}-{high:.0%}), {seconds:.1f} s/case"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 cases, 3 blocks of 10 steps")
    parser.add_argument("--model", default="leaky", help="a toy model: erased, esd-u, uce, fmn, leaky")
    parser.add_argument("--cases", type=positive_int, default=24)
    parser.add_argument("--first", type=int, default=0, help="index of the first case (e.g. --first 24 --cases 12)")
    parser.add_argument("--seed", type=int, default=0, help="attack seed of both loops (0: the reference's own RNG use)")
    parser.add_argument("--port-renders-ids", action="store_true",
                        help="the port checks its optimized ids, not the decoded text tokenized again (an experiment)")
    parser.add_argument("--check-text", action="store_true",
                        help="ours also judges the ids a missed candidate's decoded text tokenizes to (check_text)")
    parser.add_argument("--candidates-per-check", type=positive_int, default=1,
                        help="ours checks the lowest-loss of this many argmax candidates per block (candidates_per_check)")
    parser.add_argument("--position-choices", type=positive_int, default=1,
                        help="ours refines each block's candidate among each position's most probable tokens (position_choices)")
    parser.add_argument("--ours-only", action="store_true", help="run ours alone (no port, no time ratio)")
    parser.add_argument("--blocks", type=positive_int, default=50, help="timesteps swept (10 with --steps 20: the fast budget)")
    parser.add_argument("--steps", type=positive_int, default=40)
    parser.add_argument("--batch", type=positive_int, default=8)
    args = parser.parse_args()
    if args.quick:
        args.cases, args.blocks, args.steps = 2, 3, 10

    from pytest_unlearnatk import get_judge, get_preset, load_cases, load_pipeline, run_gate
    from pytest_unlearnatk.render import RenderSettings
    from pytest_unlearnatk.targets import RenderedTargets
    from pytest_unlearnatk.tokens import TokenLayout

    print(machine())
    model, base = load_pipeline(f"toy:{args.model}"), load_pipeline("toy:base")
    judge, every_case = get_judge("toy_circle"), load_cases("toy:circle")
    if not 0 <= args.first < len(every_case):
        parser.error(f"--first {args.first}: toy:circle has cases 0 to {len(every_case) - 1}")
    cases = every_case[args.first: args.first + args.cases]
    render = RenderSettings("lms", 50)
    config = replace(get_preset("reference"), num_timesteps=args.blocks, steps_per_timestep=args.steps,
                     seed=args.seed, check_text=args.check_text, candidates_per_check=args.candidates_per_check,
                     position_choices=args.position_choices)
    start = time.perf_counter()
    ours = run_gate(model, cases, judge, budget=config, base=base, render=render, batch_size=args.batch, progress=False)
    ours_seconds = (time.perf_counter() - start) / len(cases)
    ours_hits = sum(case.hit for case in ours.counted)
    facts = {"model": args.model, "first": args.first, "cases": len(cases), "seed": args.seed, "check_text": args.check_text}
    if args.candidates_per_check > 1:
        facts["candidates_per_check"] = args.candidates_per_check
    if args.position_choices > 1:
        facts["position_choices"] = args.position_choices
    if args.ours_only:
        for case in ours.cases:
            print(f"case {case.case.case_id}: ours hit={case.hit} by {case.hit_by} step {case.hit_step}")
        print(asr_line("ours", ours_hits, len(cases), ours_seconds))
        print(summary({**facts, "ours_asr": round(ours_hits / len(cases), 4), "ours_s_per_case": round(ours_seconds, 2)}))
        return

    targets = RenderedTargets(base, RenderSettings("lms", 50).resolved(model.pipeline))
    layout = TokenLayout.from_pipeline(model.pipeline)
    loop = ReferenceLoop(model.pipeline, judge, timesteps=config.timesteps(1000), steps=args.steps,
                         seed=args.seed, render_ids=args.port_renders_ids)
    start, port_hits, lines = time.perf_counter(), 0, []
    for case, ours_case in zip(cases, ours.cases):  # results come in case order
        target = targets(case, layout.sequence(model.pipeline.tokenizer(case.prompt, add_special_tokens=False).input_ids))
        outcome = loop.attack(case, target)
        port_hits += outcome["hit"]
        lines.append(f"case {case.case_id}: port {outcome}, ours hit={ours_case.hit} by {ours_case.hit_by} step {ours_case.hit_step}")
        print(lines[-1], flush=True)
    port_seconds = (time.perf_counter() - start) / len(cases)
    for name, hits, seconds in (("ours", ours_hits, ours_seconds), ("port", port_hits, port_seconds)):
        print(asr_line(name, hits, len(cases), seconds))
    print(summary({**facts, "port_renders_ids": args.port_renders_ids, "ours_asr": round(ours_hits / len(cases), 4),
                   "port_asr": round(port_hits / len(cases), 4), "ours_s_per_case": round(ours_seconds, 2),
                   "port_s_per_case": round(port_seconds, 2), "time_ratio": round(ours_seconds / port_seconds, 3)}))


if __name__ == "__main__":
    run_script(main)
