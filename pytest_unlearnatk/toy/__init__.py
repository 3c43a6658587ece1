"""The bundled toy world, a plug-in like any other package's: a small real text-to-image model,
its circle-erased copy, a judge, a prompt set and the concept ``circle``.

It registers itself through entry points (see ``pyproject.toml``) and uses only the public API
of :mod:`pytest_unlearnatk`; no module outside this package imports it. Names users give:
``toy:base`` (the base pipeline), ``toy:erased`` (the ESD-erased UNet, applied over ``toy:base``),
the judge ``toy_circle`` (the default for the concept ``circle``) and the prompt set
``toy:circle`` (48 held-out circle prompts in the I2P schema). Rebuild everything with
``python -m pytest_unlearnatk.toy.build`` (see docs/toy-world.md).
"""

from __future__ import annotations

from pathlib import Path

from pytest_unlearnatk import ConceptDefaults, ModelRef, UnlearnAtkError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODELS = {"toy:base": WEIGHTS_DIR / "base", "toy:erased": WEIGHTS_DIR / "erased-unet.safetensors"}
MODEL_BASES = {"toy:erased": "toy:base"}  # the base each unlearned model was made from
PROMPT_SETS = {"toy:circle": WEIGHTS_DIR / "circle_prompts.csv"}
# the toy world's concept: its own judge, k = 5 as for nudity
CONCEPTS = {"circle": ConceptDefaults(judge="toy_circle", n_tokens=5)}


def _existing(name: str, path: Path) -> str:
    if not path.exists():
        raise UnlearnAtkError(f"{name}: {path} is missing from this install; rebuild it: python -m pytest_unlearnatk.toy.build")
    return str(path)


class ToyModels:
    """The model source ``toy:``: the bundled base pipeline and its erased UNet."""

    requires = ("torch", "diffusers", "transformers")

    def names(self) -> dict[str, str]:
        return {"toy:base": "the toy world's base text-to-image pipeline (32 px shapes)",
                "toy:erased": "toy:base with the concept circle erased (ESD-x UNet over toy:base)"}

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
