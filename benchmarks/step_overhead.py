"""Cost of one UnlearnDiffAtk step against the model work inside it.

    python benchmarks/step_overhead.py [--quick] [--batch 1 8]

"bare" is what any method that optimizes text-encoder inputs pays: the text encoder run on ids
with 5 input embeddings that need gradients, the UNet on noised latents, the MSE, and the
backward pass down to those embeddings. "step" is a real attack step as the gate runs it (token
sampling, the lookup, the same model work, the gradient on the vocabulary-sized probabilities,
Adam, the projection onto the simplex, bookkeeping), measured as the difference of two runs of
N1 and N2 steps so that set-up, the target and the success checks cancel out.
``overhead = step / bare``. Models: the tests' tiny pipeline (32 px) and a medium SD-shaped
random-weight pipeline (CLIP ViT-L/14 text tower, half-width SD v1 UNet, 256 px).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median_seconds, never, summary, tiny_model


def attack_step_seconds(model, batch: int, steps: tuple[int, int]) -> float:
    from pytest_unlearnatk import get_preset, load_cases, run_gate
    from pytest_unlearnatk.render import RenderSettings

    cases = load_cases([f"a photo of a red circle number {i}" for i in range(batch)])
    seconds = []
    for n in (1, *steps):  # the first run warms up (allocations, caches) and is not counted
        budget = get_preset("reference", num_timesteps=1, steps_per_timestep=n)
        result = run_gate(model, cases, never, budget=budget, base=model, render=RenderSettings(steps=2),
                          batch_size=batch, progress=False)
        seconds.append(sum(c.timings["optimize_s"] for c in result.cases))  # the batch's wall time
    return (seconds[2] - seconds[1]) / (steps[1] - steps[0])


def bare_seconds(model, batch: int, repeats: int) -> float:
    import torch

    from pytest_unlearnatk.attacks.unlearndiffatk import EmbeddingInjector

    pipeline = model.pipeline
    text_encoder, unet = pipeline.text_encoder, pipeline.unet
    for module in (text_encoder, unet):
        module.requires_grad_(False)
    k, width = 5, text_encoder.config.hidden_size
    ids = torch.randint(0, 49406, (batch, 77), device=pipeline.device)
    size = unet.config.sample_size
    latents = torch.randn(batch, 4, size, size, device=pipeline.device)
    timesteps = torch.full((batch,), 500, device=pipeline.device)
    injector = EmbeddingInjector(text_encoder, list(range(1, 1 + k)))
    unet_dtype = unet.dtype  # read once: diffusers walks every parameter to answer it
    on_gpu = pipeline.device.type == "cuda"

    def work() -> None:
        embeddings = torch.randn(batch, k, width, device=pipeline.device, requires_grad=True)
        injector.embeddings = embeddings
        hidden = text_encoder(ids)[0]
        injector.embeddings = None
        noise = torch.randn_like(latents)
        prediction = unet((latents + noise).to(unet_dtype), timesteps, encoder_hidden_states=hidden).sample.float()
        (prediction - noise).pow(2).mean(dim=(1, 2, 3)).sum().backward()
        if on_gpu:
            torch.cuda.synchronize()

    with injector.active():
        return median_seconds(work, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and a 128 px medium model (about a minute)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    from pytest_unlearnatk.testing import sd_shaped_model

    rows, values = [], {}
    # (name, build, (N1, N2) attack steps, bare repeats, rounds)
    models = [("tiny", tiny_model, (20, 60) if args.quick else (50, 250), 10 if args.quick else 50, 1 if args.quick else 5),
              ("medium", lambda: sd_shaped_model("medium", 128 if args.quick else 256), (2, 4) if args.quick else (3, 8),
               2 if args.quick else 5, 1)]
    for name, build, steps, repeats, rounds in models:
        model = build()
        for batch in args.batch:
            if name == "medium" and batch > 2 and args.quick:
                continue
            # alternate the two measurements and take medians: on a busy machine drift hits both alike
            pairs = [(attack_step_seconds(model, batch, steps), bare_seconds(model, batch, repeats))
                     for _ in range(rounds)]
            step = statistics.median(p[0] for p in pairs)
            bare = statistics.median(p[1] for p in pairs)
            rows.append((name, batch, step * 1000, bare * 1000, step / bare))
            if batch == 1:
                values.update({f"{name}_step_ms": step * 1000, f"{name}_bare_ms": bare * 1000, f"{name}_overhead": step / bare})
            else:
                values[f"{name}_b{batch}_overhead"] = step / bare
        del model
    print(f"machine: {machine()}")
    print(f"{'model':<8}{'batch':>6}{'step ms':>12}{'bare ms':>12}{'overhead':>10}")
    for name, batch, step_ms, bare_ms, ratio in rows:
        print(f"{name:<8}{batch:>6}{step_ms:>12.2f}{bare_ms:>12.2f}{ratio:>10.3f}")
    print(summary(values))


if __name__ == "__main__":
    main()
