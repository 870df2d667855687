"""What superposition draws on the toy zoo, counted by the evaluator (issue 6).

    python -m bench.superpose_zoo [--seeds 128] [--only NAME]

Writes ``bench/results/superpose-zoo-<device>.json``: for each case its recipe, the colour/shape
counts, the measured rates and, where issue 6 sets one, the target range. The cases:

- OR of ``toy-warm`` and ``toy-cool``, prompt "a circle": a 50/50 mixture of warm (red, yellow) and
  cool (green, blue) circles; with bias [0, log 3] a 1:3 mixture. The same two models averaged
  (fixed κ = ½) for comparison, and each model alone.
- Two prompts on ``toy-warm``, "a red shape" and "a circle": AND should draw red circles, OR the
  union (red squares and yellow circles too); the averaging and joint-prompt baselines beside them,
  each prompt alone, and the mixture of the two alone (the mean of their rates: what OR aims at).
  OR runs with the pipeline's default temperature, the guidance scale (``temperature: null``;
  see ``SuperpositionPipeline.__call__``); the paper's T = 1 under CFG is reported beside it.
- AND of two *different* models: ``toy-warm`` with "a red shape" and ``toy-base`` + ``toy-star``
  LoRA with "a star": red stars, which neither model draws alone (reported, no target).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from bench import RESULTS
from composer import registry
from composer.device import device_name
from toyworld.measure import DEFAULT_SAMPLER, generate_labels

WARM, COOL = ("red", "yellow"), ("green", "blue")


@dataclass(frozen=True)
class Case:
    name: str
    recipe: dict
    rates: dict = field(default_factory=dict)
    """rate name → predicate on (colour, shape)."""
    targets: dict = field(default_factory=dict)
    """rate name → (low, high) from issue 6."""


def _superpose(mode, experts, prompt="a shape", bias=None, temperature=None) -> dict:
    return {
        "prompt": prompt,
        "method": "superpose",
        "experts": experts,
        "superpose": {"mode": mode, "temperature": temperature, "bias": bias},
        "sampler": dict(DEFAULT_SAMPLER),
    }


def _single(model, prompt, loras=()) -> dict:
    return {
        "prompt": prompt,
        "experts": [{"model": model, "loras": [{"path": p, "weight": 1.0} for p in loras]}],
        "sampler": dict(DEFAULT_SAMPLER),
    }


MIXTURE_RATES = {
    "warm": lambda c, s: c in WARM,
    "cool": lambda c, s: c in COOL,
    "circle": lambda c, s: s == "circle",
}
PROMPT_RATES = {
    "red circle": lambda c, s: (c, s) == ("red", "circle"),
    "red, not circle": lambda c, s: c == "red" and s != "circle",
    "circle, not red": lambda c, s: s == "circle" and c != "red",
}
WARM_COOL = [{"model": "toy-warm"}, {"model": "toy-cool"}]
RED_CIRCLE = [
    {"model": "toy-warm", "prompt": "a red shape"},
    {"model": "toy-warm", "prompt": "a circle"},
]
RED_STAR = [
    {"model": "toy-warm", "prompt": "a red shape"},
    {"model": "toy-base", "loras": [{"path": "toy-star", "weight": 1.0}], "prompt": "a star"},
]
STAR_RATES = {
    "red star": lambda c, s: (c, s) == ("red", "star"),
    "red": lambda c, s: c == "red",
    "star": lambda c, s: s == "star",
}

CASES = (
    Case(
        "or warm+cool 'a circle'",
        _superpose("or", WARM_COOL, "a circle"),
        MIXTURE_RATES,
        {"warm": (0.40, 0.60), "circle": (0.85, 1.0)},
    ),
    Case(
        "or warm+cool 'a circle' bias [0, log 3]",
        _superpose("or", WARM_COOL, "a circle", [0.0, math.log(3)]),
        MIXTURE_RATES,
        {"cool": (0.65, 0.85)},
    ),
    Case(
        "average warm+cool 'a circle'", _superpose("average", WARM_COOL, "a circle"), MIXTURE_RATES
    ),
    Case("toy-warm alone 'a circle'", _single("toy-warm", "a circle"), MIXTURE_RATES),
    Case("toy-cool alone 'a circle'", _single("toy-cool", "a circle"), MIXTURE_RATES),
    Case(
        "and toy-warm 'a red shape' x 'a circle'",
        _superpose("and", RED_CIRCLE),
        PROMPT_RATES,
        {"red circle": (0.80, 1.0)},
    ),
    Case("or toy-warm 'a red shape' x 'a circle'", _superpose("or", RED_CIRCLE), PROMPT_RATES),
    Case(
        "or T=1 toy-warm 'a red shape' x 'a circle'",
        _superpose("or", RED_CIRCLE, temperature=1.0),
        PROMPT_RATES,
    ),
    Case(
        "average toy-warm 'a red shape' x 'a circle'",
        _superpose("average", RED_CIRCLE),
        PROMPT_RATES,
    ),
    Case(
        "joint toy-warm 'a red shape and a circle'",
        _superpose("joint", RED_CIRCLE),
        PROMPT_RATES,
    ),
    Case("toy-warm alone 'a red circle'", _single("toy-warm", "a red circle"), PROMPT_RATES),
    Case("toy-warm alone 'a red shape'", _single("toy-warm", "a red shape"), PROMPT_RATES),
    Case("toy-warm alone 'a circle' (prompt rates)", _single("toy-warm", "a circle"), PROMPT_RATES),
    Case(
        "and toy-warm 'a red shape' x toy-base+toy-star 'a star'",
        _superpose("and", RED_STAR),
        STAR_RATES,
    ),
    Case(
        "or toy-warm 'a red shape' x toy-base+toy-star 'a star'",
        _superpose("or", RED_STAR),
        STAR_RATES,
    ),
)


def run_case(case: Case, seeds: int, cache: registry.ModelCache | None = None) -> dict:
    """Generate ``seeds`` images of ``case`` and count them."""
    labels, seconds = generate_labels(case.recipe, seeds, cache)
    rates = {name: sum(rule(c, s) for c, s in labels) / seeds for name, rule in case.rates.items()}
    return {
        "case": case.name,
        "recipe": case.recipe,
        "n": seeds,
        "rates": rates,
        "targets": {k: list(v) for k, v in case.targets.items()},
        "met": {k: lo <= rates[k] <= hi for k, (lo, hi) in case.targets.items()},
        "pairs": dict(Counter(f"{c} {s}" for c, s in labels).most_common()),
        "seconds_per_image": seconds / seeds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.superpose_zoo")
    parser.add_argument("--seeds", type=int, default=128)
    parser.add_argument("--only", help="run only the cases whose name contains this")
    args = parser.parse_args(argv)
    registry.quiet_libraries()
    cache = registry.ModelCache()
    start = time.time()
    rows = []
    for case in CASES:
        if args.only and args.only not in case.name:
            continue
        row = run_case(case, args.seeds, cache)
        rows.append(row)
        rates = "  ".join(f"{k} {v:.0%}" for k, v in row["rates"].items())
        met = "".join(f"  [{k} {'ok' if ok else 'MISSED'}]" for k, ok in row["met"].items())
        print(f"{case.name:<58} {rates}{met}", flush=True)
    prompts_alone = ("toy-warm alone 'a red shape'", "toy-warm alone 'a circle' (prompt")
    alone = [r for r in rows if r["case"].startswith(prompts_alone)]
    if len(alone) == 2:
        mixture = {k: (alone[0]["rates"][k] + alone[1]["rates"][k]) / 2 for k in PROMPT_RATES}
        name = "mixture of the two prompts alone (what OR aims at)"
        rows.append({"case": name, "rates": mixture, "n": 2 * args.seeds})
        print(f"{rows[-1]['case']:<58} " + "  ".join(f"{k} {v:.0%}" for k, v in mixture.items()))
    out = {
        "benchmark": "superposition on the toy zoo (issue 6)",
        "device": device_name(),
        "sampler": DEFAULT_SAMPLER,
        "seeds": args.seeds,
        "minutes": round((time.time() - start) / 60, 1),
        "cases": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    path = RESULTS / f"superpose-zoo-{kind}.json"
    if not args.only:
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
