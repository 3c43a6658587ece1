"""Token layout and the long-prompt policy, with the real CLIP tokenizer."""

from __future__ import annotations

import pytest

from pytest_unlearnatk import Case, UnlearnAtkError, load_cases
from pytest_unlearnatk.tokens import TokenLayout, fit_prompt

LAYOUT = TokenLayout(max_length=77, bos_id=49406, eos_id=49407, pad_id=49407, vocab_size=49408)


def test_sequence_places_adversarial_tokens_after_bos_and_pads_to_max_length():
    ids = LAYOUT.sequence([320, 1125], [7, 8, 9])
    assert ids[:7] == [49406, 7, 8, 9, 320, 1125, 49407]
    assert len(ids) == 77 and set(ids[7:]) == {49407}


def test_layout_comes_from_the_pipeline(tiny_model):
    layout = TokenLayout.from_pipeline(tiny_model.pipeline)
    assert layout == LAYOUT


def test_short_prompt_fits_untouched(tokenizer):
    fitted = fit_prompt(Case("0", "a photo of a church"), tokenizer, LAYOUT, n_adversarial=5)
    assert fitted.content_ids == [320, 1125, 539, 320, 2735] and not fitted.truncated


LONG = Case("9", " ".join(["church"] * 80))


def test_long_prompt_is_truncated_and_marked(tokenizer):
    fitted = fit_prompt(LONG, tokenizer, LAYOUT, n_adversarial=5, policy="truncate")
    assert fitted.truncated and fitted.n_prompt_tokens == 80
    assert len(fitted.content_ids) == 77 - 2 - 5
    assert len(LAYOUT.sequence(fitted.content_ids, [1] * 5)) == 77


def test_long_prompt_skip_gives_a_reason(tokenizer):
    fitted = fit_prompt(LONG, tokenizer, LAYOUT, n_adversarial=5, policy="skip")
    assert fitted.skip_reason == "case 9: prompt has 80 tokens; with 5 adversarial tokens only 70 fit in 77"


def test_long_prompt_error_policy_raises(tokenizer):
    with pytest.raises(UnlearnAtkError, match="case 9: prompt has 80 tokens.*policy 'error'"):
        fit_prompt(LONG, tokenizer, LAYOUT, n_adversarial=5, policy="error")


def test_unknown_policy(tokenizer):
    with pytest.raises(UnlearnAtkError, match="use one of truncate, skip, error"):
        fit_prompt(LONG, tokenizer, LAYOUT, 5, policy="drop")


def test_reference_nudity_set_has_long_prompts_and_none_is_lost(reference_prompts, tokenizer):
    """The reference code silently dropped prompts over 60 tokens; we keep every case."""
    cases = load_cases(reference_prompts / "nudity.csv")
    fitted = [fit_prompt(c, tokenizer, LAYOUT, 5) for c in cases]
    assert len(fitted) == 142
    assert any(f.truncated for f in fitted)
    assert all(len(f.content_ids) <= 70 for f in fitted)
