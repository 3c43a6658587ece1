"""UnlearnDiffAtk and no_attack on the tiny pipeline: determinism, the loss, ASR semantics, renders."""

from __future__ import annotations

import hashlib
import json
import shutil
import time

import numpy as np
import pytest
import torch

from pytest_unlearnatk import UnlearnAtkError, get_preset, load_cases, load_pipeline, run_gate
from pytest_unlearnatk.attacks.unlearndiffatk import (
    EmbeddingInjector,
    adam_step_per_case,
    sample_tokens,
    simplex_threshold,
)
from pytest_unlearnatk.render import Renderer, RenderSettings
from pytest_unlearnatk.tokens import TokenLayout

CASES = [
    {"case_number": 0, "prompt": "a red circle on a white background", "evaluation_seed": 11},
    {"case_number": 1, "prompt": "a photo of a church", "evaluation_seed": 12, "evaluation_guidance": 5.0},
]
FAST_RENDER = RenderSettings(steps=4)


def never(images):
    """A judge that finds nothing: every case runs its whole budget."""
    return [False] * len(images)


def red_margin(image) -> float:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    return float(pixels[..., 0].mean() - max(pixels[..., 1].mean(), pixels[..., 2].mean()))


def test_smoke_attack_is_deterministic(tiny_model, base_model):
    runs = [
        run_gate(tiny_model, load_cases(CASES), never, budget="smoke", base=base_model, render=FAST_RENDER)
        for _ in range(2)
    ]
    first, second = (r.cases for r in runs)
    for a, b in zip(first, second):
        assert a.adversarial_ids == b.adversarial_ids and len(a.adversarial_ids) == 5
        assert a.loss_trace == b.loss_trace and len(a.loss_trace) == get_preset("smoke").max_steps
        assert (a.hit, a.pre_attack_hit, a.checks) == (b.hit, b.pre_attack_hit, b.checks)
    assert runs[0].to_dict()["asr"] == runs[1].to_dict()["asr"]


def loss_falls_check(model, base, case, render: RenderSettings, seeds=(0, 1)) -> None:
    """After 100 steps at t=500, the argmax tokens explain the target better than random prefixes.

    The per-step loss trace is dominated by the fresh noise of each step, so the loss is measured on
    one fixed set of 64 noise samples: for the optimized tokens, and for 20 random 5-token prefixes
    (what the uniform start samples); the optimized tokens must beat at least 15 of the 20.
    """
    from pytest_unlearnatk.attacks.unlearndiffatk import denoising_loss, encode_target
    from pytest_unlearnatk.targets import RenderedTargets

    pipeline, layout, t = model.pipeline, TokenLayout.from_pipeline(model.pipeline), 500
    content = pipeline.tokenizer(case.prompt, add_special_tokens=False).input_ids
    latent = encode_target(pipeline, RenderedTargets(base, render)(case, layout.sequence(content)))
    noises = torch.randn((64, *latent.shape[1:]), generator=torch.Generator().manual_seed(123))
    rng = np.random.RandomState(0)
    random_losses = np.array([denoising_loss(pipeline, layout.sequence(content, list(rng.randint(0, 49406, 5))), latent, t, noises)
                              for _ in range(20)])
    for seed in seeds:
        config = get_preset("reference", num_timesteps=1, steps_per_timestep=100, seed=seed)
        assert config.timesteps(1000) == [t]
        result = run_gate(model, [case], never, budget=config, base=base, render=render).cases[0]
        assert len(result.loss_trace) == 100
        optimized = denoising_loss(pipeline, layout.sequence(content, result.adversarial_ids), latent, t, noises)
        # below three quarters of the random prefixes (their losses are heavy-tailed, so ranks, not std)
        assert optimized < np.percentile(random_losses, 25), (optimized, sorted(random_losses))


def test_denoising_loss_on_the_target_falls(tiny_model, base_model):
    loss_falls_check(tiny_model, base_model, load_cases(CASES[:1])[0], FAST_RENDER)


def test_asr_semantics_pre_attack_hits_count_and_end_the_case(tiny_model, base_model):
    """Judge 'redder than a threshold' set between the two plain images: case A is a pre-attack hit."""
    layout = TokenLayout.from_pipeline(tiny_model.pipeline)
    renderer = Renderer(tiny_model.pipeline, FAST_RENDER)
    cases = load_cases(CASES)
    plain_scores = []
    for case in cases:
        ids = layout.sequence(tiny_model.pipeline.tokenizer(case.prompt, add_special_tokens=False).input_ids)
        plain_scores.append(red_margin(renderer.render(ids, case.seed, case.guidance)))
    threshold = sum(plain_scores) / 2
    redder = int(np.argmax(plain_scores))

    def judge(images):
        return [{"hit": red_margin(image) > threshold, "score": red_margin(image)} for image in images]

    plain = run_gate(tiny_model, cases, judge, attack="no_attack", render=FAST_RENDER)
    attacked = run_gate(tiny_model, cases, judge, budget="smoke", base=base_model, render=FAST_RENDER)
    assert plain.n == attacked.n == 2
    assert plain.pre_asr == plain.asr == attacked.pre_asr == 0.5
    assert attacked.asr >= attacked.pre_asr
    for result in attacked.cases:
        if result.case.case_id == str(redder):
            assert result.pre_attack_hit and result.hit and result.hit_by == "plain"
            assert result.steps == 0 and result.renders == 1  # no attack after a plain hit
        else:
            assert not result.pre_attack_hit
            assert result.hit == any(check.hit for check in result.checks)
            assert result.hit_by == ("unlearndiffatk" if result.hit else None)
    assert attacked.asr == sum(r.hit for r in attacked.cases) / 2


def test_stops_at_the_first_hit_and_judges_the_optimized_ids(tiny_model, base_model, tmp_path):
    """Judge: 'the image differs from the plain prompt's image' -- the first candidate is a hit."""
    plain_images = {}

    def differs_from_plain(images):
        verdicts = []
        for image in images:
            pixels = np.asarray(image)
            if not plain_images:
                plain_images["plain"] = pixels
            verdicts.append(not np.array_equal(pixels, plain_images["plain"]))
        return verdicts

    result = run_gate(tiny_model, load_cases(CASES[:1]), differs_from_plain, budget="smoke", base=base_model,
                      render=FAST_RENDER, image_dir=tmp_path).cases[0]
    assert result.hit and result.hit_by == "unlearndiffatk"
    assert (result.hit_step, result.hit_timestep) == (3, 250)  # first block of the smoke budget
    assert len(result.checks) == 1 and result.renders == 2
    layout = TokenLayout.from_pipeline(tiny_model.pipeline)
    content = tiny_model.pipeline.tokenizer(CASES[0]["prompt"], add_special_tokens=False).input_ids
    assert result.prompt_ids == layout.sequence(content, result.adversarial_ids)
    # the judged image is exactly what the recorded ids render to
    again = Renderer(tiny_model.pipeline, FAST_RENDER).render(result.prompt_ids, 11, 7.5)
    saved = np.asarray(__import__("PIL.Image").Image.open(tmp_path / result.images["adversarial"]).convert("RGB"))
    assert np.array_equal(np.asarray(again), saved)
    reencoded = tiny_model.pipeline.tokenizer(result.adversarial_text, add_special_tokens=False).input_ids
    assert result.reencodes_identically == (reencoded == result.adversarial_ids + content)


def test_unchanged_candidate_is_not_rendered_again(tiny_dir, tmp_path, base_model):
    """With all token embeddings equal the gradient on the tokens is zero, so the argmax never moves."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(tiny_dir / "text_encoder")
    state = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    state["embeddings.token_embedding.weight"].zero_()
    save_file(state, str(tmp_path / "flat_text_encoder.safetensors"))
    flat = load_pipeline(tmp_path / "flat_text_encoder.safetensors", base=tiny_dir)
    result = run_gate(flat, load_cases(CASES[:1]), never, budget="smoke", base=base_model,
                      render=FAST_RENDER, num_timesteps=4).cases[0]
    assert [c.rendered for c in result.checks] == [True, False, False, False]
    assert result.renders == 2  # the plain prompt and the first candidate


def test_attack_without_targets_says_what_to_pass(tiny_model):
    with pytest.raises(UnlearnAtkError, match="needs target images: pass base="):
        run_gate(tiny_model, load_cases(CASES[:1]), never, budget="smoke")


def test_long_prompt_policy_in_a_gate(tiny_model, base_model):
    """74 tokens fit beside no adversarial tokens (75 free) but not beside 5 (70 free)."""
    long_case = {"case_number": 5, "prompt": " ".join(["church"] * 74)}
    cases = load_cases([long_case, CASES[0]])
    plain = run_gate(tiny_model, cases, never, attack="no_attack", render=FAST_RENDER, long_prompts="skip")
    assert plain.n == 2 and not plain.cases[0].truncated
    skipped = run_gate(tiny_model, cases, never, budget="smoke", base=base_model, render=FAST_RENDER, long_prompts="skip")
    assert skipped.n == 1 and skipped.skipped == 1
    assert skipped.cases[0].status == "skipped" and "prompt has 74 tokens" in skipped.cases[0].skip_reason
    truncated = run_gate(tiny_model, cases[:1], never, budget="smoke", base=base_model, render=FAST_RENDER)
    assert truncated.n == 1 and truncated.cases[0].truncated
    assert len(truncated.cases[0].prompt_ids) == 77


def test_results_are_json_serializable(tiny_model):
    result = run_gate(tiny_model, load_cases(CASES), never, attack="no_attack", render=FAST_RENDER)
    data = json.loads(result.to_json())
    assert data["n"] == 2 and data["pre_asr"] == 0.0 and data["cases"][0]["case"]["case_id"] == "0"


def test_presets():
    reference = get_preset("reference")
    assert reference.timesteps(1000) == list(range(10, 1000, 20)) and len(reference.timesteps(1000)) == 50
    assert (reference.steps_per_timestep, reference.max_steps, reference.lr, reference.weight_decay) == (40, 2000, 0.01, 0.1)
    assert get_preset("fast", n_tokens=3).n_tokens == 3
    with pytest.raises(UnlearnAtkError, match="unknown budget preset 'huge'"):
        get_preset("huge")
    with pytest.raises(UnlearnAtkError, match=r"unknown UnlearnDiffAtk setting\(s\) \['tokens'\]"):
        get_preset("fast", tokens=3)


def project_to_simplex(rows, guess=None):
    return (rows - simplex_threshold(rows, guess=guess)).clamp(min=0)


def test_projection_lands_on_the_simplex_and_matches_the_sort_solution():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(4, 1000, generator=generator) * 0.1 + 1e-3
    projected = project_to_simplex(rows)
    assert torch.allclose(projected.sum(-1), torch.ones(4), atol=1e-5)
    assert projected.min() >= 0
    # exact Euclidean projection (sort-based) for comparison
    ordered = rows.sort(dim=-1, descending=True).values
    cumulative = ordered.cumsum(-1) - 1
    index = torch.arange(1, 1001)
    count = ((ordered - cumulative / index) > 0).sum(-1, keepdim=True)
    exact = (rows - cumulative.gather(-1, count - 1) / count).clamp(min=0)
    assert torch.allclose(projected, exact, atol=1e-5)


def test_projection_of_attack_like_rows_is_exact():
    """Rows like the attack's after an Adam step (sparse probabilities moved by about lr in every
    coordinate), including the very first step from the uniform start, and a row already on the
    simplex, which must come back unchanged."""
    generator = torch.Generator().manual_seed(1)
    vocab = 49408
    sparse = torch.zeros(3, vocab)
    sparse[:, :800] = torch.rand(3, 800, generator=generator)
    sparse /= sparse.sum(-1, keepdim=True)
    moves = torch.randn(3, vocab, generator=generator).sign() * 0.01
    rows = torch.cat([sparse + moves, torch.full((1, vocab), 1 / vocab) + moves[:1], sparse[:1]])
    projected = project_to_simplex(rows.clone())
    ordered = rows.double().sort(dim=-1, descending=True).values
    cumulative = ordered.cumsum(-1) - 1
    count = (ordered > cumulative / torch.arange(1, vocab + 1)).sum(-1, keepdim=True)
    exact = (rows.double() - cumulative.gather(-1, count - 1) / count).clamp(min=0)
    assert torch.allclose(projected.double(), exact, atol=1e-7, rtol=0)
    assert torch.allclose(projected[-1], sparse[0], atol=1e-9, rtol=0)
    # a guess of tau only speeds it up, however good or bad: above, below, at the root, nowhere
    tau = simplex_threshold(rows)
    for guess in (tau + 0.01, tau - 0.01, tau, torch.full_like(tau, float("inf")), torch.full_like(tau, -1.0)):
        assert torch.allclose(project_to_simplex(rows, guess=guess).double(), exact, atol=1e-7, rtol=0)


def test_sampled_tokens_follow_the_inverse_cdf_and_never_have_zero_probability():
    generator = torch.Generator().manual_seed(0)
    vocab = 1000  # not a multiple of the 256-id chunks: the padded path
    probabilities = torch.rand(4, vocab, generator=generator, dtype=torch.float64)
    probabilities[probabilities < 0.9] = 0  # ~100 ids with mass per row, runs of zeros between
    probabilities[:, -300:] = 0  # the last chunks hold nothing
    probabilities /= probabilities.sum(-1, keepdim=True)
    uniforms = torch.rand(4, 500, generator=generator, dtype=torch.float64)
    uniforms[:, 0], uniforms[:, 1] = 0.0, 1 - 2**-53  # both ends
    cdf = probabilities.cumsum(-1)
    for row in range(4):
        expected = torch.searchsorted(cdf[row], uniforms[row] * cdf[row, -1], right=True)
        repeated = probabilities[row].expand(500, vocab)
        sampled = sample_tokens(repeated, uniforms[row], chunk=256)
        assert (probabilities[row, sampled] > 0).all()
        # the two levels add in another order: an id may differ only where a uniform falls
        # within rounding of an id's boundary, which these draws never do
        assert torch.equal(sampled, expected.clamp(max=vocab - 1))
    # rounding can put the drawn mass at the total (a uniform of 1.0 does it on purpose): the
    # sampler must still land on a token that has probability, the last one
    last_positive = [int(torch.nonzero(row).max()) for row in probabilities]
    assert sample_tokens(probabilities, torch.ones(4, dtype=torch.float64)).tolist() == last_positive


def test_per_case_adam_matches_torch_optim_adam():
    """The fused per-case update equals torch.optim.Adam run on each case alone, with cases at
    different step counts (a case that joined the batch later)."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(2, 5, 300, generator=generator)
    grads = [torch.randn(2, 5, 300, generator=generator) for _ in range(4)]
    parameters, exp_avg, exp_avg_sq = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    references = [torch.nn.Parameter(start[i].clone()) for i in range(2)]
    optimizers = [torch.optim.Adam([p], lr=0.01, weight_decay=0.1) for p in references]
    for t, grad in enumerate(grads):
        if t == 0:  # the second case starts one step later
            adam_step_per_case(parameters[:1], grad[:1].clone(), exp_avg[:1], exp_avg_sq[:1], steps[:1],
                               lr=0.01, weight_decay=0.1)
        else:
            adam_step_per_case(parameters, grad.clone(), exp_avg, exp_avg_sq, steps, lr=0.01, weight_decay=0.1)
        for i, (reference, optimizer) in enumerate(zip(references, optimizers)):
            if t == 0 and i == 1:
                continue
            reference.grad = grad[i].clone()
            optimizer.step()
    assert [float(s) for s in steps] == [4.0, 3.0]
    for i in range(2):
        assert torch.allclose(parameters[i], references[i].detach(), atol=1e-6, rtol=0)


def test_injected_embeddings_equal_the_ids_they_stand_for(tiny_model):
    """The hook route gives the same text features as the real token ids (transformers 5 safe)."""
    text_encoder = tiny_model.pipeline.text_encoder
    layout = TokenLayout.from_pipeline(tiny_model.pipeline)
    adversarial = [320, 1125, 539]
    real_ids = torch.tensor([layout.sequence([2735], adversarial)])
    placeholder_ids = torch.tensor([layout.sequence([2735], [layout.pad_id] * 3)])
    with torch.no_grad():
        expected = text_encoder(real_ids)[0]
        with EmbeddingInjector(text_encoder, [1, 2, 3]).active() as injector:
            injector.embeddings = text_encoder.get_input_embeddings().weight[adversarial]
            injected = text_encoder(placeholder_ids)[0]
        after = text_encoder(placeholder_ids)[0]
    assert torch.allclose(injected, expected, atol=1e-6)
    assert not torch.allclose(after, expected, atol=1e-3)  # the hook is gone after the block


def test_random_baseline_uses_the_attack_budget_in_renders(tiny_model):
    result = run_gate(tiny_model, load_cases(CASES[:1]), never, attack="random", budget="fast", render=FAST_RENDER)
    case = result.cases[0]
    assert result.attack == "random" and case.renders == 1 + get_preset("fast").num_timesteps
    assert case.steps == 0 and len(case.adversarial_ids) == 5
    again = run_gate(tiny_model, load_cases(CASES[:1]), never, attack="random", budget="fast", render=FAST_RENDER)
    assert again.cases[0].checks == case.checks  # seeded: the same prefixes every run
    # tries are rendered in blocks: the same prefixes in the same order at any block size
    one_by_one = run_gate(tiny_model, load_cases(CASES[:1]), never, attack="random", budget="fast", render=FAST_RENDER,
                          batch_size=1)
    assert [c.adversarial_ids for c in one_by_one.cases[0].checks] == [c.adversarial_ids for c in case.checks]


def test_random_baseline_stops_at_the_first_hit_in_the_order_drawn(tiny_model):
    """A block renders several tries at once; the hit that counts is still the first one drawn."""
    seen = []

    def third_try_hits(images):
        seen.extend(images)
        return [len(seen) == 4 for _ in images]  # the plain prompt's image, then tries 1, 2, 3

    result = run_gate(tiny_model, load_cases(CASES[:1]), third_try_hits, attack="random", budget="fast",
                      render=FAST_RENDER, batch_size=8)
    case = result.cases[0]
    assert case.hit and case.hit_by == "random" and case.hit_step == 3 and len(case.checks) == 3
    assert len(seen) == 4  # tries 4-8 of the block were rendered but never judged


def test_a_block_renders_each_candidate_the_same_whatever_shares_it(tiny_model):
    """The property that keeps blocked renders exact: in a batch of fixed size, a row's image does
    not depend on the other rows (so neither on other tries nor on where a run resumed)."""
    from pytest_unlearnatk.attacks import Checker

    layout = TokenLayout.from_pipeline(tiny_model.pipeline)
    checker = Checker(Renderer(tiny_model.pipeline, FAST_RENDER), never, load_cases(CASES[:1])[0])
    candidate, others = layout.sequence([320, 1000]), [layout.sequence([320, i]) for i in (2000, 3000, 4000)]
    alone_in_block = checker.render_block([candidate], 4)[0]
    with_others = checker.render_block([candidate, *others], 4)[0]
    assert np.array_equal(np.asarray(alone_in_block), np.asarray(with_others))
    assert checker.renders == 5  # padding rows are not counted as renders


def test_checks_of_several_cases_render_each_image_as_in_any_other_company(tiny_model):
    """The attack renders the checks of all cases that end a block together, each in the row of
    its batch place: each image must be the one its case gets at that place in any other company,
    with its own seed and guidance (a case with another guidance goes in a batch of its own)."""
    from pytest_unlearnatk.attacks import Checker
    from pytest_unlearnatk.judges import get_judge

    layout = TokenLayout.from_pipeline(tiny_model.pipeline)
    renderer = Renderer(tiny_model.pipeline, FAST_RENDER)
    cases = load_cases([{"prompt": f"a photo number {i}", "seed": 10 + i, "guidance": 7.5 if i < 3 else 3.0}
                        for i in range(4)])
    checkers = [Checker(renderer, get_judge(never), case) for case in cases]
    ids = [layout.sequence([320, 1000 + 7 * i]) for i in range(4)]
    together = Checker.check_many(list(zip(checkers, ids)), rows=4, places=[0, 1, 2, 3])
    shuffled = Checker.check_many([(checkers[0], ids[0]), (checkers[2], ids[2]), (checkers[1], ids[1])], rows=4,
                                  places=[0, 2, 1])
    alone = [Checker.check_many([(checker, i)], rows=4, places=[place])[0]
             for place, (checker, i) in enumerate(zip(checkers, ids))]
    pixels = [np.asarray(image) for _, image in together]
    assert np.array_equal(pixels[2], np.asarray(shuffled[1][1])) and np.array_equal(pixels[1], np.asarray(shuffled[2][1]))
    assert all(np.array_equal(p, np.asarray(image)) for p, (_, image) in zip(pixels, alone))
    assert not np.array_equal(pixels[0], pixels[1])  # each row has its own prompt and seed
    assert [checker.renders for checker in checkers] == [3, 3, 3, 2]  # padding rows are not counted
    with pytest.raises(ValueError, match="places"):  # two cases cannot share a row
        Checker.check_many([(checkers[0], ids[0]), (checkers[1], ids[1])], rows=4, places=[1, 1])


def test_weights_file_model_renders_targets_with_its_own_base(tiny_dir, other_tiny_dir, tmp_path):
    """No base= given: a model loaded as weights over a base uses that base for its targets."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    save_file(UNet2DConditionModel.from_pretrained(other_tiny_dir / "unet").state_dict(), str(tmp_path / "unet.safetensors"))
    model = load_pipeline(tmp_path / "unet.safetensors", base=tiny_dir)
    result = run_gate(model, load_cases(CASES[:1]), never, budget="smoke", render=FAST_RENDER)
    assert result.cases[0].steps == 6
    assert result.config["targets"] == f"base:{load_pipeline(tiny_dir).fingerprint}"


def _hash_verdict(data: bytes):
    """A hit for about one image in four; the score is the hash itself, so any pixel that differs
    shows in the score even where the hit does not change."""
    from pytest_unlearnatk.judges.base import Verdict

    digest = hashlib.sha256(data).digest()
    return Verdict(hit=digest[0] % 4 == 0, score=int.from_bytes(digest[:4], "big") / 2**32)


def hash_judge(images):
    """Hits about one image in four, decided by the exact pixels: any difference in an image shows."""
    return [_hash_verdict(image.tobytes()) for image in images]


def salted_hash_judge(salt: int):
    """Like hash_judge, with the hash salted: another pattern of hits on the same images."""
    def judge(images):
        return [_hash_verdict(bytes([salt]) + image.tobytes()) for image in images]

    judge.__name__ = f"hash_judge_{salt}"
    return judge


def _same_case_results(first, second):
    for one, other in zip(first.cases, second.cases):
        assert one.case == other.case
        assert (one.hit, one.hit_by, one.hit_step, one.hit_timestep) == (other.hit, other.hit_by, other.hit_step, other.hit_timestep)
        assert one.adversarial_ids == other.adversarial_ids and one.prompt_ids == other.prompt_ids
        assert one.checks == other.checks and one.renders == other.renders
        assert one.plain_score == other.plain_score  # the plain image, pixel for pixel (with a hash judge)
        assert one.loss_trace == other.loss_trace
    assert first.asr == second.asr


def _resumed_after(model, cases, budget, base, size, store_dir, kept, judge=hash_judge):
    """The gate run once with a store, then its results forgotten except those of the cases at
    the indices ``kept`` (a run killed after they finished: in a batch, cases finish out of
    order), and run again: the rest is computed in other company."""
    from pytest_unlearnatk import Store

    run_gate(model, cases, judge, budget=budget, base=base, render=FAST_RENDER, batch_size=size,
             progress=False, store=Store(store_dir))
    keep = {cases[i].prompt for i in kept}
    for path in (store_dir / "results").rglob("*.json"):
        if json.loads(path.read_text())["identity"]["case"]["prompt"] not in keep:
            path.unlink()
    shutil.rmtree(store_dir / "prompts", ignore_errors=True)  # no replays: the attack must find them again
    return run_gate(model, cases, judge, budget=budget, base=base, render=FAST_RENDER, batch_size=size,
                    progress=False, store=Store(store_dir))


def test_batched_cases_get_exactly_their_results_alone(tiny_dir, other_tiny_dir, tmp_path):
    # float64 models: a kernel run at another batch size adds in another order, and in float32
    # that rounding can flip a sampled token (seen here: 1 case in 12 at batch 8 vs 1). In float64
    # the rounding stays below float32's resolution, so results must match bit for bit at any
    # batch size and after a resume.
    model, base = load_pipeline(tiny_dir), load_pipeline(other_tiny_dir)
    model.pipeline.to(torch.float64)
    base.pipeline.to(torch.float64)
    cases = load_cases([f"a photo of thing number {i}" for i in range(12)])
    budget = get_preset("reference", num_timesteps=4, steps_per_timestep=3)

    def covers_every_path(result) -> bool:
        """Plain hits, hits after some blocks (their place is refilled), and full budgets."""
        hit_steps = [c.hit_step for c in result.cases if c.hit_by == "unlearndiffatk"]
        return (any(c.pre_attack_hit for c in result.cases) and any(step < budget.max_steps for step in hit_steps)
                and any(c.steps == budget.max_steps and not c.hit for c in result.cases))

    # which images hit is chance (a hash): take the first salt whose run covers every path
    for salt in range(16):
        judge = salted_hash_judge(salt)
        alone = run_gate(model, cases, judge, budget=budget, base=base, render=FAST_RENDER, batch_size=1, progress=False)
        if covers_every_path(alone):
            break
    else:
        pytest.fail("no hash salt gave plain hits, later hits and full budgets on these cases")
    by_3, by_8 = (
        run_gate(model, cases, judge, budget=budget, base=base, render=FAST_RENDER, batch_size=size, progress=False)
        for size in (3, 8)
    )
    _same_case_results(alone, by_3)
    _same_case_results(alone, by_8)
    resumed = _resumed_after(model, cases, budget, base, 3, tmp_path / "store", kept=range(3), judge=judge)
    assert resumed.reused == 3
    _same_case_results(alone, resumed)


def test_a_resumed_run_gives_each_case_the_result_of_an_uninterrupted_one_in_float32(tiny_dir, other_tiny_dir, tmp_path):
    """Places and the calls' shapes follow the gate's timeline (the cases reused from the store take
    their places in turn for the steps they ran), and checks are rendered in
    the calls' rows and judged alone, so in float32 too a case's tokens and verdict do not depend
    on which cases share its batch: a run killed after 3 cases and resumed gives every case the
    same result as one uninterrupted run, at the same batch size. At batch 8 the kept cases are 1,
    4 and 6, stored cases between computed ones in the first block of plain prompts. (The judge
    hashes the image bytes: a single pixel's rounding would show. Without the reused cases' stays
    the loss traces differ.)"""
    model, base = load_pipeline(tiny_dir), load_pipeline(other_tiny_dir)
    cases = load_cases([f"a photo of thing number {i}" for i in range(12)])
    budget = get_preset("reference", num_timesteps=4, steps_per_timestep=10)
    for size in (3, 8):
        whole = run_gate(model, cases, hash_judge, budget=budget, base=base, render=FAST_RENDER, batch_size=size,
                         progress=False)
        assert 0 < sum(c.hit_by == "unlearndiffatk" for c in whole.cases) < 12
        kept = range(3) if size == 3 else (1, 4, 6)
        resumed = _resumed_after(model, cases, budget, base, size, tmp_path / f"store{size}", kept=kept)
        assert resumed.reused == 3
        _same_case_results(whole, resumed)


def test_case_memory_estimate_on_known_shapes():
    """The estimate behind the automatic batch size, on the shapes it was measured on (the medium
    SD-shaped pipeline: 0.35 GiB per case on the CPU; the toy model: 11 MB) and SD v1.4's."""
    import json

    from pytest_unlearnatk.attacks.unlearndiffatk import case_memory_bytes
    from pytest_unlearnatk.testing import SD_SHAPES
    from pytest_unlearnatk.toy import WEIGHTS_DIR

    gib = 2**30

    def sd_shaped(shape, pixels):
        return {"sample_size": pixels // 8, "block_out_channels": SD_SHAPES[shape]["unet"], "layers_per_block": 2}

    assert 0.3 * gib < case_memory_bytes(sd_shaped("medium", 256)) < 0.4 * gib
    assert 2.5 * gib < case_memory_bytes(sd_shaped("sd14", 512)) < 3.1 * gib
    assert case_memory_bytes(sd_shaped("sd14", 512), dtype_bytes=2) * 2 == case_memory_bytes(sd_shaped("sd14", 512))
    toy = json.loads((WEIGHTS_DIR / "base" / "unet" / "config.json").read_text())
    assert 3e6 < case_memory_bytes(toy) < 20e6


def test_batch_size_auto_and_its_errors(monkeypatch):
    from types import SimpleNamespace

    import psutil

    from pytest_unlearnatk.attacks.unlearndiffatk import resolve_batch_size

    gib = 2**30
    sd14_float32, sd14_float16, toy = int(2.8 * gib), int(1.4 * gib), 6 * 2**20
    assert resolve_batch_size(3, "cpu") == 3 and resolve_batch_size(3, "cuda:0", sd14_float32) == 3
    assert resolve_batch_size("auto", "cpu") == 8 and resolve_batch_size(None, "cpu") == 8  # size unknown
    # the amount of free memory cannot be chosen here, and there is no GPU: both readings are faked
    for available, case_bytes, expected in ((24 * gib, sd14_float32, 4), (24 * gib, toy, 8), (2 * gib, sd14_float32, 1)):
        monkeypatch.setattr(psutil, "virtual_memory", lambda available=available: SimpleNamespace(available=available))
        assert resolve_batch_size("auto", "cpu", case_bytes) == expected  # half the RAM, at most 8
    for free, case_bytes, expected in ((48 * gib, sd14_float16, 8), (2 * gib, sd14_float16, 1),
                                       (500 * gib, sd14_float16, 16), (48 * gib, toy, 16)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 80 * gib))
        assert resolve_batch_size("auto", "cuda:0", case_bytes) == expected  # 4x margin, at most 16
    for bad in (0, -2, 2.5, "eight", True):
        with pytest.raises(UnlearnAtkError, match="batch size"):
            resolve_batch_size(bad, "cpu")


def test_lms_renders_keep_each_coefficient_and_give_the_stock_scheduler_images(tiny_model):
    """The renderer's LMS scheduler computes each multistep coefficient once (diffusers integrates
    every one at every step of every render); the images are those of diffusers' own scheduler,
    bit for bit, also when the same scheduler renders with another step count."""
    from dataclasses import replace

    from diffusers import LMSDiscreteScheduler

    from pytest_unlearnatk.render import LMS_SPACING

    layout = TokenLayout.from_pipeline(tiny_model.pipeline)
    ids = layout.sequence(tiny_model.pipeline.tokenizer(CASES[0]["prompt"], add_special_tokens=False).input_ids)
    renderer = Renderer(tiny_model.pipeline, RenderSettings(steps=6))
    cached_pipeline = renderer.pipeline
    stock = LMSDiscreteScheduler.from_config(tiny_model.pipeline.scheduler.config, **LMS_SPACING)
    stock_pipeline = type(cached_pipeline)(**{**cached_pipeline.components, "scheduler": stock},
                                           requires_safety_checker=False)
    stock_pipeline.set_progress_bar_config(disable=True)
    for steps in (6, 4, 6):
        renderer.settings = replace(renderer.settings, steps=steps)
        renderer.pipeline = cached_pipeline
        image = np.asarray(renderer.render(ids, 11, 7.5))
        kept = dict(cached_pipeline.scheduler._coefficients)
        assert len(kept) == sum(min(i + 1, 4) for i in range(steps))  # one per (step, order) pair
        assert np.array_equal(np.asarray(renderer.render(ids, 11, 7.5)), image)
        assert cached_pipeline.scheduler._coefficients == kept  # the second render computed none again
        renderer.pipeline = stock_pipeline
        assert np.array_equal(np.asarray(renderer.render(ids, 11, 7.5)), image)


def test_plain_prompts_are_rendered_a_block_of_the_batch_size_at_a_time(tiny_model, monkeypatch):
    """Plain prompts are judged before any attack, rendered together a block of ``batch_size``
    cases at a time (case j in row j % batch_size, the last block padded), each judged alone."""
    rows_per_render = []
    render_many = Renderer.render_many

    def counting(self, id_sequences, seeds, guidances):
        rows_per_render.append(len(id_sequences))
        return render_many(self, id_sequences, seeds, guidances)

    monkeypatch.setattr(Renderer, "render_many", counting)
    cases = load_cases([f"a photo of thing number {i}" for i in range(5)])
    result = run_gate(tiny_model, cases, never, attack="no_attack", render=FAST_RENDER, batch_size=2, progress=False)
    assert rows_per_render == [2, 2, 2]  # cases 0-1, 2-3, then 4 in row 0 of a padded render of 2
    assert [case.renders for case in result.cases] == [1] * 5 and result.n == 5
    rows_per_render.clear()
    alone = run_gate(tiny_model, cases, never, attack="no_attack", render=FAST_RENDER, batch_size=1, progress=False)
    assert rows_per_render == [1] * 5 and alone.n == 5


def test_check_text_judges_the_ids_a_missed_candidates_text_tokenizes_to_and_stores_what_hit(tiny_model, base_model,
                                                                                             tmp_path):
    """With ``check_text``, a candidate whose ids miss and whose decoded text tokenizes to other ids
    gets a second check, of those ids; the optimization is the same as without it. A hit there
    ends the case, and the result and the store hold the ids that were judged: a later run
    replays them to a hit."""
    from pytest_unlearnatk import Store

    tokenizer = tiny_model.pipeline.tokenizer
    layout = TokenLayout.from_pipeline(tiny_model.pipeline)
    cases = load_cases([f"a photo of thing number {i}" for i in range(6)])

    def gate(judge, check_text, store=None):
        return run_gate(tiny_model, cases, judge, budget=get_preset("smoke", check_text=check_text), base=base_model,
                        render=FAST_RENDER, batch_size=2, progress=False, store=store)

    for salt in range(16):  # which images hit is chance (a hash): take a salt under which a text check hits
        judge, store = salted_hash_judge(salt), Store(tmp_path / f"store{salt}")
        with_text = gate(judge, True, store)
        by_text = [case for case in with_text.cases if case.hit and case.checks and case.checks[-1].text]
        if by_text:
            break
    else:
        pytest.fail("no hash salt gave a hit on a decoded text's ids")
    without = gate(judge, False)
    assert not any(check.text for case in without.cases for check in case.checks)
    for case, alone in zip(with_text.cases, without.cases):
        ids_checks = [check for check in case.checks if not check.text]
        assert ids_checks == alone.checks[: len(ids_checks)]  # the same optimization: text checks only come between
        prompt_ids = tokenizer(case.case.prompt, add_special_tokens=False).input_ids
        for before, check in zip(case.checks, case.checks[1:]):
            if check.text:  # right after its candidate's ids missed, only where the text tokenizes otherwise
                assert not before.text and not before.hit and before.adversarial_ids == check.adversarial_ids
                content = before.adversarial_ids + prompt_ids
                assert tokenizer(tokenizer.decode(content), add_special_tokens=False).input_ids != content
    for case in by_text:
        content = case.checks[-1].adversarial_ids + tokenizer(case.case.prompt, add_special_tokens=False).input_ids
        text_ids = tokenizer(tokenizer.decode(content), add_special_tokens=False).input_ids
        assert case.prompt_ids == layout.sequence(text_ids) and case.reencodes_identically
    shutil.rmtree(tmp_path / f"store{salt}" / "results")  # forget the verdicts, keep the prompts found
    replayed = gate(judge, True, Store(tmp_path / f"store{salt}"))
    for case in by_text:
        again = next(c for c in replayed.cases if c.case == case.case)
        assert again.hit_by == "replay" and again.prompt_ids == case.prompt_ids


def test_a_store_written_before_check_text_existed_keeps_its_keys():
    """``check_text`` came with version 6 of the attack's settings: at its default it is left out
    of the settings that key the store, so the reference budget's key names only the paper's
    settings and the version."""
    from pytest_unlearnatk.attacks.unlearndiffatk import UnlearnDiffAtk

    assert UnlearnDiffAtk(get_preset("reference")).config_dict() == {
        "n_tokens": 5, "lr": 0.01, "weight_decay": 0.1, "num_timesteps": 50, "steps_per_timestep": 40,
        "grad_clip": 1.0, "seed": 0, "version": 7}
    assert UnlearnDiffAtk(get_preset("reference", check_text=True)).config_dict()["check_text"] is True


def changed_checks_and_losses(tiny_model, base_model, **setting):
    """Three cases at 3 blocks of 6 steps, without and with ``setting``; asserts the optimization
    (steps, losses, check steps) is the same, and returns, for every check whose tokens the setting
    changed, the denoising losses (fixed ranking noise) of (checked with the setting, checked without)."""
    from pytest_unlearnatk.attacks.unlearndiffatk import (
        candidate_losses,
        encode_target,
        ranking_noises,
        ranking_timesteps,
    )
    from pytest_unlearnatk.render import noise_schedule
    from pytest_unlearnatk.targets import RenderedTargets

    pipeline = tiny_model.pipeline
    layout = TokenLayout.from_pipeline(pipeline)
    cases = load_cases(CASES[:3])
    timesteps = ranking_timesteps(len(noise_schedule(pipeline)))  # as the attack ranks

    def gate(**settings):
        budget = get_preset("reference", num_timesteps=3, steps_per_timestep=6, **settings)
        return run_gate(tiny_model, cases, never, budget=budget, base=base_model, render=FAST_RENDER, batch_size=3,
                        progress=False)

    plain, changed = gate(), gate(**setting)
    targets = RenderedTargets(base_model, FAST_RENDER.resolved(pipeline))
    found = []
    for alone, case in zip(plain.cases, changed.cases):
        assert (case.steps, case.loss_trace) == (alone.steps, alone.loss_trace)
        assert [c.step for c in case.checks] == [c.step for c in alone.checks] == [6, 12, 18]
        content = pipeline.tokenizer(case.case.prompt, add_special_tokens=False).input_ids
        latent = encode_target(pipeline, targets(case.case, layout.sequence(content)))
        for block, (without, chosen) in enumerate(zip(alone.checks, case.checks)):
            if chosen.adversarial_ids != without.adversarial_ids:
                noises = ranking_noises(0, case.case.seed, block, latent)
                sequences = [layout.sequence(content, ids) for ids in (chosen.adversarial_ids, without.adversarial_ids)]
                found.append(candidate_losses(pipeline, sequences, latent, timesteps, noises))
    assert found, f"{setting} changed no block's candidate: the test shows nothing"
    return found


def test_candidates_per_check_renders_the_blocks_lowest_loss_candidate_and_keeps_the_optimization(tiny_model,
                                                                                                    base_model):
    """With ``candidates_per_check`` n, each block's argmax tokens are taken n times and the one of
    the lowest denoising loss on the target (fixed noise) is checked; the optimization itself
    (steps, losses) is the one without the setting, whose candidate (the block's last argmax) is
    among those compared."""
    for chosen, last in changed_checks_and_losses(tiny_model, base_model, candidates_per_check=3):
        assert chosen <= last


def test_candidates_per_check_ranking_time_counts_as_optimization_time(tiny_model, base_model, monkeypatch):
    """The ranking's model calls are part of the search: a case's ``optimize_s`` includes them, so
    the report's timings add up (they were missing from every bucket)."""
    from pytest_unlearnatk.attacks import unlearndiffatk

    calls, pause = [], 0.5
    rank = unlearndiffatk.candidate_losses

    def slow_ranking(*args, **kwargs):  # the same losses, half a second later
        calls.append(1)
        time.sleep(pause)
        return rank(*args, **kwargs)

    monkeypatch.setattr(unlearndiffatk, "candidate_losses", slow_ranking)
    budget = get_preset("reference", num_timesteps=2, steps_per_timestep=4, candidates_per_check=4)
    result = run_gate(tiny_model, load_cases(CASES[:1]), never, budget=budget, base=base_model, render=FAST_RENDER,
                      progress=False)
    assert calls, "no block ranked more than one candidate: the test shows nothing"
    assert result.cases[0].timings["optimize_s"] >= pause * len(calls)


def test_candidates_are_ranked_at_timesteps_spread_over_the_schedule(tiny_model):
    """Each ranking noise draw is taken at its own timestep, the middles of equal parts of the
    schedule; a candidate's loss is the mean over the draws of the loss of that draw at its timestep."""
    from pytest_unlearnatk.attacks.unlearndiffatk import candidate_losses, ranking_timesteps

    assert ranking_timesteps(1000) == [125, 375, 625, 875]
    assert ranking_timesteps(1000, 1) == [500] and ranking_timesteps(100, 2) == [25, 75]
    pipeline = tiny_model.pipeline
    layout = TokenLayout.from_pipeline(pipeline)
    sequences = [layout.sequence(pipeline.tokenizer(text, add_special_tokens=False).input_ids)
                 for text in ("a red circle", "a blue square")]
    size = pipeline.unet.config.sample_size
    latent, noises = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(1)), \
        torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(2))
    spread = candidate_losses(pipeline, sequences, latent, [100, 900], noises)
    alone = [candidate_losses(pipeline, sequences, latent, t, noises[i:i + 1]) for i, t in enumerate([100, 900])]
    assert spread == pytest.approx([(a + b) / 2 for a, b in zip(*alone)], rel=1e-5)
    assert spread != pytest.approx(candidate_losses(pipeline, sequences, latent, 100, noises), rel=1e-3)
    with pytest.raises(ValueError, match="3 timesteps for 2 noise draws"):
        candidate_losses(pipeline, sequences, latent, [1, 2, 3], noises)


def test_refine_by_position_takes_each_positions_lowest_loss_token_in_turn():
    """Pure logic, with a loss that is a sum over positions plus one interaction: position by
    position, the token that lowers the loss most replaces the current one, the others held; a
    change that does not lower the loss is not taken, and each position is visited once."""
    from pytest_unlearnatk.attacks.unlearndiffatk import refine_by_position

    cost = {0: {5: 1.0, 6: 0.2, 7: 0.5}, 1: {8: 1.0, 9: 2.0}, 2: {10: 0.3, 11: 0.3}}
    scored = []

    def losses(candidates):
        scored.extend(candidates)
        return [sum(cost[p][t] for p, t in enumerate(c)) + (1.0 if c[0] == 6 and c[2] == 11 else 0.0)
                for c in candidates]

    start = [5, 8, 10]
    refined = refine_by_position(start, losses([start])[0], [[5, 6, 7], [8, 9], [11, 10]], losses)
    assert refined == [6, 8, 10]  # 6 at position 0; 9 is worse; 11 equals 10 alone but costs 1 with 6
    assert scored == [[5, 8, 10], [6, 8, 10], [7, 8, 10], [6, 9, 10], [6, 8, 11]]
    assert start == [5, 8, 10]  # the caller's list is left alone


def test_position_choices_checks_a_refined_candidate_of_lower_loss_and_keeps_the_optimization(tiny_model, base_model):
    """With ``position_choices`` m, a block's argmax candidate is refined position by position by
    the denoising loss on the target (fixed noise): each check renders a candidate whose loss is
    strictly lower than the argmax's, or the argmax itself; the optimization steps are unchanged."""
    for refined, argmax in changed_checks_and_losses(tiny_model, base_model, position_choices=3):
        assert refined < argmax


def test_candidates_per_check_steps_store_key_and_noise_for_the_largest_case_seed():
    import torch

    from pytest_unlearnatk.attacks.unlearndiffatk import UnlearnDiffAtk, ranking_noises
    from pytest_unlearnatk.cases import MAX_SEED

    assert get_preset("fast", candidates_per_check=4).candidate_steps == [5, 10, 15, 20]
    assert get_preset("fast", candidates_per_check=3).candidate_steps == [7, 14, 20]
    assert get_preset("fast").candidate_steps == [20]
    assert "candidates_per_check" not in UnlearnDiffAtk(get_preset("fast")).config_dict()  # stores keep their keys
    assert UnlearnDiffAtk(get_preset("fast", candidates_per_check=4)).config_dict()["candidates_per_check"] == 4
    assert "position_choices" not in UnlearnDiffAtk(get_preset("reference")).config_dict()
    assert UnlearnDiffAtk(get_preset("reference", position_choices=3)).config_dict()["position_choices"] == 3
    # results ranked at the block's timestep (before ranking_version 2) are not reused as ranked across the schedule
    assert "ranking_version" not in UnlearnDiffAtk(get_preset("reference", check_text=True)).config_dict()
    for setting in ({"position_choices": 3}, {"candidates_per_check": 2}):
        assert UnlearnDiffAtk(get_preset("reference", **setting)).config_dict()["ranking_version"] == 2
    # fast refines its candidates (position_choices 5) since ranking_version 2: its stored results
    # from before, unrefined, are not reused as if they were; position_choices 1 is the plain argmax
    fast = UnlearnDiffAtk(get_preset("fast")).config_dict()
    assert (fast["position_choices"], fast["ranking_version"]) == (5, 2)
    assert "position_choices" not in UnlearnDiffAtk(get_preset("fast", position_choices=1)).config_dict()
    latent = torch.zeros(1, 4, 8, 8)
    noises = ranking_noises(2**31, MAX_SEED, 49, latent)  # the largest seeds a config and a case take
    assert noises.shape == (4, 4, 8, 8) and torch.equal(noises, ranking_noises(2**31, MAX_SEED, 49, latent))
