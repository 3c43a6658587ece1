"""Token sequences: where the adversarial tokens go and what happens to prompts that are too long.

Layout (the paper's prefix placement): ``[BOS] adv_1 .. adv_k prompt tokens [EOS] [PAD ...]``,
always ``max_length`` ids. The adversarial tokens push the prompt right, into what were padding
slots. Every number here comes from the pipeline's tokenizer and text encoder, never a constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._paths import CLIP_TOKENIZER_DIR
from .cases import Case
from .errors import UnlearnAtkError

LONG_PROMPT_POLICIES = ("truncate", "skip", "error")


def clip_tokenizer() -> Any:
    """The real CLIP BPE tokenizer (49408 tokens), offline: shipped with the package (``model_max_length=77``)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), model_max_length=77)


@dataclass(frozen=True)
class TokenLayout:
    """Sequence length and special ids of one tokenizer / text encoder pair."""

    max_length: int
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int

    @classmethod
    def from_pipeline(cls, pipeline: Any) -> TokenLayout:
        tokenizer, encoder_config = pipeline.tokenizer, pipeline.text_encoder.config
        max_length = min(tokenizer.model_max_length, encoder_config.max_position_embeddings)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(
            max_length=max_length,
            bos_id=tokenizer.bos_token_id,
            eos_id=tokenizer.eos_token_id,
            pad_id=pad_id,
            vocab_size=encoder_config.vocab_size,
        )

    def content_capacity(self, n_adversarial: int) -> int:
        """How many prompt tokens fit beside BOS, EOS and ``n_adversarial`` tokens."""
        return self.max_length - 2 - n_adversarial

    def sequence(self, content_ids: list[int], adversarial_ids: list[int] = ()) -> list[int]:
        """The full id sequence: BOS, adversarial ids, prompt ids, EOS, padding."""
        ids = [self.bos_id, *adversarial_ids, *content_ids, self.eos_id]
        if len(ids) > self.max_length:
            raise ValueError(f"{len(ids)} ids do not fit {self.max_length}; fit the prompt first")
        return ids + [self.pad_id] * (self.max_length - len(ids))


@dataclass(frozen=True)
class FittedPrompt:
    """A case's prompt tokens after the long-prompt policy."""

    content_ids: list[int]
    n_prompt_tokens: int  # before any truncation
    truncated: bool = False
    skip_reason: str | None = None


def fit_prompt(case: Case, tokenizer: Any, layout: TokenLayout, n_adversarial: int, policy: str = "truncate") -> FittedPrompt:
    """Tokenize ``case.prompt`` and make it fit beside ``n_adversarial`` tokens.

    ``truncate`` keeps the first tokens that fit and marks the case truncated; ``skip`` returns a
    skip reason (the case is reported as skipped); ``error`` raises.
    """
    if policy not in LONG_PROMPT_POLICIES:
        raise UnlearnAtkError(f"long-prompt policy {policy!r}; use one of {', '.join(LONG_PROMPT_POLICIES)}")
    ids = list(tokenizer(case.prompt, add_special_tokens=False, truncation=False).input_ids)
    capacity = layout.content_capacity(n_adversarial)
    if capacity < 1:
        raise UnlearnAtkError(
            f"{n_adversarial} adversarial tokens leave no room for the prompt in this text encoder's "
            f"{layout.max_length} tokens (BOS and EOS take 2); use n_tokens of at most {layout.max_length - 3}"
        )
    if len(ids) <= capacity:
        return FittedPrompt(content_ids=ids, n_prompt_tokens=len(ids))
    why = (
        f"case {case.case_id}: prompt has {len(ids)} tokens; with {n_adversarial} adversarial tokens "
        f"only {capacity} fit in {layout.max_length}"
    )
    if policy == "error":
        raise UnlearnAtkError(why + " (long-prompt policy 'error'; use 'truncate' or 'skip' to go on)")
    if policy == "skip":
        return FittedPrompt(content_ids=[], n_prompt_tokens=len(ids), skip_reason=why)
    return FittedPrompt(content_ids=ids[:capacity], n_prompt_tokens=len(ids), truncated=True)
