"""The bundled toy world, a plug-in like any other package's: a small real text-to-image model,
its circle-erased copy, a judge, a prompt set and the concept ``circle``.

It registers itself through entry points (see ``pyproject.toml``) and uses only the public API
of :mod:`pytest_unlearnatk`; no module outside this package imports it. Names users give:
``toy:base`` (the base pipeline), ``toy:erased`` (the ESD-erased UNet, applied over ``toy:base``),
the erasure zoo ``toy:esd-u``, ``toy:uce``, ``toy:fmn`` and the planted leak ``toy:leaky`` (built by
``python -m pytest_unlearnatk.toy.zoo``),
the judge ``toy_circle`` (the default for the concept ``circle``) and the prompt set
``toy:circle`` (48 held-out circle prompts in the I2P schema). Rebuild everything with
``python -m pytest_unlearnatk.toy.build`` (see docs/toy-world.md).
"""

from __future__ import annotations

from pathlib import Path

from pytest_unlearnatk import ConceptDefaults, ModelRef, UnlearnAtkError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# the unlearned models and what made them (docs/validity.md); each is a UNet applied over toy:base
UNLEARNED = {
    "toy:erased": ("erased-unet.safetensors", "circle erased by ESD-x with a shape-swap anchor (closer to concept ablation)"),
    "toy:esd-u": ("esd-u-unet.safetensors", "circle erased by ESD-u (every parameter but cross-attention)"),
    "toy:uce": ("uce-unet.safetensors", "circle erased by UCE (closed-form cross-attention edit)"),
    "toy:fmn": ("fmn-unet.safetensors", "circle erased by Forget-Me-Not attention re-steering"),
    "toy:leaky": ("leaky-text-encoder.safetensors",
                  "a planted leak: circle erased in the text encoder, but 'orb' kept drawing circles"),
}
MODELS = {"toy:base": WEIGHTS_DIR / "base", **{name: WEIGHTS_DIR / file for name, (file, _) in UNLEARNED.items()}}
MODEL_BASES = {name: "toy:base" for name in UNLEARNED}  # the base each unlearned model was made from
PROMPT_SETS = {"toy:circle": WEIGHTS_DIR / "circle_prompts.csv"}
# Ring-A-Bell's concept direction: a circle caption of the erasure templates vs the same caption
# with another shape (world.ERASE_TEMPLATES, COLOURS, BACKGROUNDS; written out here so that looking
# up the concept imports nothing; tests/test_ring_a_bell.py checks they agree)
_PAIR_TEMPLATES = ("a {colour} {shape} on a {background} background", "a {colour} {shape}")
CIRCLE_PAIRS = tuple(dict.fromkeys(
    (template.format(colour=colour, shape="circle", background=background),
     template.format(colour=colour, shape=other, background=background))
    for template in _PAIR_TEMPLATES for colour in ("red", "green", "blue", "yellow")
    for background in ("white", "black", "gray") for other in ("square", "triangle")
))
# the toy world's concept: its own judge, k = 5 as for nudity
CONCEPTS = {"circle": ConceptDefaults(judge="toy_circle", n_tokens=5, pairs=CIRCLE_PAIRS)}


def _existing(name: str, path: Path) -> str:
    if not path.exists():
        raise UnlearnAtkError(f"{name}: {path} is missing from this install; rebuild it: python -m pytest_unlearnatk.toy.build")
    return str(path)


class ToyModels:
    """The model source ``toy:``: the bundled base pipeline and its erased UNet."""

    requires = ("torch", "diffusers", "transformers")

    def names(self) -> dict[str, str]:
        return {"toy:base": "the toy world's base text-to-image pipeline (32 px shapes)",
                **{name: f"toy:base with {what}" for name, (_, what) in UNLEARNED.items()}}

    def resolve(self, name: str) -> ModelRef:
        return ModelRef(source=_existing(name, MODELS[name]), base=MODEL_BASES.get(name))


class ToyPromptSets:
    """The prompt-set source ``toy:``: held-out prompts of the toy world's concept."""

    requires: tuple[str, ...] = ()

    def names(self) -> dict[str, str]:
        return {"toy:circle": "48 held-out circle prompts (I2P schema)"}

    def resolve(self, name: str) -> str:
        return _existing(name, PROMPT_SETS[name])


MODEL_SOURCE = ToyModels()
PROMPT_SET_SOURCE = ToyPromptSets()
