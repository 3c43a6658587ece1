"""Does the attack find what an erasure leaves? One table over the toy erasure zoo.

    python benchmarks/validity.py [--quick] [--models erased esd-u uce fmn leaky] [--cases 48]
                                  [--reference-cases 24] [--batch 8] [--attacks ring-a-bell p4d-n ...]

Rows: the toy world's unlearned models (docs/validity.md says how each was made). Columns, each
with its 95% Wilson interval and seconds per case: the plain prompts (pre-ASR), random tokens at
the `fast` budget (the same number of renders as UnlearnDiffAtk's checks), UnlearnDiffAtk `fast`,
and UnlearnDiffAtk `reference` on the first ``--reference-cases`` prompts (0 leaves it out: about
a minute per case here). Judge ``toy_circle``, targets from ``toy:base``, DDIM 20-step renders as
in the main job; no store, so every number is computed now. ``toy:leaky`` is the known answer:
its erasure keeps the word "orb" drawing circles, so an attack that works breaks most of its
cases while plain prompts and random tokens do not.

``--attacks``: the other registered attacks as more columns, each at its `fast` budget, ``--batch``
cases at once where the attack batches (``p4d-n``, ``p4d-k``, ``concept-inversion``; the last
is a white-box upper bound: learned embeddings, not prompts), else one case at a time
(``ring-a-bell``). The summary line then also gives each column's
seconds per case (``<model>_<attack>_s``), measured in the same run as UnlearnDiffAtk's.

``--columns ... 'UnlearnDiffAtk fast, check_text'`` (and the others of ``OPT_IN_COLUMNS``): columns
not computed by default, UnlearnDiffAtk `fast` with one of its settings changed: ``check_text``
(each missed candidate's decoded text judged too), ``candidates_per_check`` (the lowest-loss of
20 argmax candidates per block is checked), ``position_choices`` 1 (the paper's check: the argmax
tokens as they are, what `fast` checked before 2026-12-04) or 3 (each position of a block's
candidate may take whichever of its 3 most probable tokens lowers the loss most; `fast`: 5).

``--quick``: toy:leaky (the planted leak, the known answer), 8 prompts, no reference column (about a minute).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, positive_int, run_script, summary

MODELS = ("erased", "esd-u", "uce", "fmn", "leaky")
COLUMNS = (("pre-ASR", "no_attack", None), ("random", "random", "fast"), ("UnlearnDiffAtk fast", "unlearndiffatk", "fast"),
           ("UnlearnDiffAtk reference", "unlearndiffatk", "reference"))
# columns computed only when named in --columns: UnlearnDiffAtk fast with settings that are off by
# default (docs/validity.md), and those settings
OPT_IN_COLUMNS = {
    "UnlearnDiffAtk fast, check_text": {"check_text": True},
    "UnlearnDiffAtk fast, candidates_per_check 20": {"candidates_per_check": 20},
    "UnlearnDiffAtk fast, candidates_per_check 20, check_text": {"candidates_per_check": 20, "check_text": True},
    "UnlearnDiffAtk fast, position_choices 1": {"position_choices": 1},
    "UnlearnDiffAtk fast, position_choices 3": {"position_choices": 3},
}
MORE = {"ring-a-bell": "Ring-A-Bell fast", "p4d-n": "P4D-n fast", "p4d-k": "P4D-k fast",
        "concept-inversion": "concept inversion fast (white-box bound)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy:leaky only, 8 prompts, no reference column")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--cases", type=positive_int, default=48, help="prompts of toy:circle per column (default: all 48)")
    parser.add_argument("--reference-cases", type=int, default=24, help="prompts for the reference column (0: leave it out)")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--columns", nargs="+", default=[name for name, _, _ in COLUMNS],
                        choices=[name for name, _, _ in COLUMNS] + list(OPT_IN_COLUMNS), metavar="COLUMN",
                        help="columns to compute (default: the first four): "
                        + ", ".join(repr(n) for n in [*(n for n, _, _ in COLUMNS), *OPT_IN_COLUMNS]))
    parser.add_argument("--attacks", nargs="+", default=[], choices=sorted(MORE),
                        help="more columns: these attacks at their fast budget")
    args = parser.parse_args()
    if args.reference_cases < 0:
        parser.error(f"--reference-cases {args.reference_cases}: give 0 (no reference column) or more")
    if args.quick:
        args.models, args.cases, args.reference_cases = ["leaky"], 8, 0

    from pytest_unlearnatk import load_cases, load_pipeline, run_gate
    from pytest_unlearnatk.render import RenderSettings
    from pytest_unlearnatk.report import wilson_interval

    print(machine())
    base, render = load_pipeline("toy:base"), RenderSettings("pipeline", 20)
    cases = load_cases("toy:circle")
    wanted = [(name, attack, budget) for name, attack, budget in COLUMNS
              if name in args.columns and (budget != "reference" or args.reference_cases)]
    wanted += [(name, "unlearndiffatk", "fast") for name in OPT_IN_COLUMNS if name in args.columns]
    wanted += [(MORE[attack], attack, "fast") for attack in args.attacks]
    header = ["model", *(name for name, _, _ in wanted)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    values = {}
    for name in args.models:
        model = load_pipeline(f"toy:{name}")
        cells = [f"toy:{name}"]
        for column, attack, budget in wanted:
            count = args.reference_cases if budget == "reference" else args.cases
            start = time.perf_counter()
            settings = OPT_IN_COLUMNS.get(column, {})
            result = run_gate(model, cases[:count], "toy_circle", attack=attack, budget=budget, base=base, render=render,
                              batch_size=args.batch, concept="circle", progress=False, **settings)
            per_case = (time.perf_counter() - start) / result.n
            hits = sum(case.hit for case in result.counted)
            low, high = wilson_interval(hits, result.n)
            cells.append(f"{hits}/{result.n} = {hits / result.n:.0%} ({low:.0%}-{high:.0%}), {per_case:.1f} s/case")
            key = f"{name}_{attack if attack != 'unlearndiffatk' else 'uda'}{'_' + budget if budget else ''}".replace("-", "_")
            key += "".join(f"_{setting}" if value is True else f"_{setting}_{value}" for setting, value in settings.items())
            values[key] = round(hits / result.n, 4)
            if args.attacks:
                values[f"{key}_s"] = round(per_case, 2)
            print(f"toy:{name} {column}: {cells[-1]}", flush=True)
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print(summary(values))


if __name__ == "__main__":
    run_script(main)
