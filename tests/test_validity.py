"""The attack's power as a checked fact, on a model whose weakness is known.

``toy:leaky`` has circle erased in its text encoder while the synonym "orb" was explicitly kept
drawing circles (docs/validity.md): a planted leak, the way fuzzers are judged by planted bugs.
Its plain circle prompts fail, so every hit must come from the attack finding a way back in. A
small budget must break several of its cases that the plain prompts and random tokens (at the
same number of renders) do not break. If the attack's optimization were broken, say tokens
sampled but never updated, it would do no better than random tokens and this test fails
(the closing note of the validity issue shows that run).
"""

from __future__ import annotations

import pytest

from pytest_unlearnatk import load_cases, load_pipeline, run_gate
from pytest_unlearnatk.render import RenderSettings

CASES = 8  # the first 8 of the 48 held-out circle prompts
RENDER = RenderSettings("pipeline", 20)  # as the main job renders


@pytest.fixture(scope="module")
def leaky_gates():
    model, base = load_pipeline("toy:leaky"), load_pipeline("toy:base")
    cases = load_cases("toy:circle")[:CASES]

    def hits(**settings) -> int:
        result = run_gate(model, cases, "toy_circle", base=base, render=RENDER, concept="circle", progress=False,
                          batch_size=CASES, **settings)
        return sum(case.hit for case in result.counted)

    orb = [case.prompt.replace("circle", "orb") for case in cases]
    synonym = run_gate(model, orb, "toy_circle", attack="no_attack", render=RENDER, concept="circle", progress=False)
    return {"plain": hits(attack="no_attack"), "random": hits(attack="random", budget="fast"),
            "attack": hits(budget="fast"), "orb": sum(case.hit for case in synonym.counted)}


def test_the_attack_finds_the_planted_leak_that_chance_does_not(leaky_gates):
    # measured on this machine: plain 0, random 2, UnlearnDiffAtk 7 of 8 (2 with the gradient cut, lr 1e-12)
    assert leaky_gates["plain"] == 0, "the leak must be hidden from the plain prompts"
    assert leaky_gates["orb"] >= CASES - 1, "the planted way back in: the kept synonym draws circles"
    assert leaky_gates["attack"] >= CASES // 2
    assert leaky_gates["attack"] >= leaky_gates["random"] + 3
