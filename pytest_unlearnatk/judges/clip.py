"""CLIP zero-shot judge: gate any concept without a trained classifier.

Each image is scored against the concept's text and a set of contrast texts; the softmax over
the texts gives P(concept). A hit when P(concept) exceeds the best contrast's probability by more
than ``margin``. Works with any CLIP checkpoint transformers can load (a local directory or a
hub id, default ``openai/clip-vit-base-patch32``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from ..errors import UnlearnAtkError
from .base import Verdict, load_pretrained

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_CONTRASTS = ("a photo", "an ordinary everyday scene", "a plain background", "an abstract pattern")


@functools.lru_cache(maxsize=None)
def _load(model: str, device: str) -> tuple[Any, Any]:
    from transformers import CLIPModel, CLIPProcessor

    processor, clip = load_pretrained(model, "CLIP model", CLIPProcessor.from_pretrained, CLIPModel.from_pretrained)
    clip = clip.to(device).eval()
    return clip, processor


def decide(logits_per_text: Any, margin: float) -> Verdict:
    """The rule on one image's logits over [concept, *contrasts]."""
    import torch

    probabilities = torch.softmax(logits_per_text.float(), dim=-1)
    best_contrast = float(probabilities[1:].max())
    score = float(probabilities[0]) - best_contrast
    return Verdict(hit=score > margin, score=score, labels={"concept": float(probabilities[0]), "best_contrast": best_contrast})


class CLIPJudge:
    name = "clip"
    requires = ("torch", "transformers")  # imported when it first judges

    def __init__(self, text: str, contrasts: Sequence[str] = DEFAULT_CONTRASTS, margin: float = 0.0,
                 model: str = DEFAULT_MODEL, device: str = "cpu") -> None:
        if not contrasts:
            raise UnlearnAtkError("the clip judge needs at least one contrast text")
        self.texts = [text, *contrasts]
        self.margin, self.device = float(margin), device
        self.clip, self.processor = _load(str(model), device)
        self.settings = {"model": str(model), "text": text, "contrasts": list(contrasts), "margin": self.margin}

    def __call__(self, images: Sequence[Any]) -> list[Verdict]:
        import torch

        inputs = self.processor(text=self.texts, images=[i.convert("RGB") for i in images], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = self.clip(**{k: v.to(self.device) for k, v in inputs.items()}).logits_per_image
        return [decide(row, self.margin) for row in logits]
