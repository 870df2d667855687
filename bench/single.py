"""Benchmark the ``single`` method: time to first image (cold: load + sample) and per-step time.

    python -m bench.single [--model toy-warm] [--steps 20] [--repeats 5]

Writes ``bench/results/single-<device>.json`` with the device named. The toy zoo targets one
20-step image at native size in ≤ 1.5 s on 2 CPU cores (issue 4).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

from bench import RESULTS
from composer import engine, registry
from composer.device import device_name
from composer.recipe import parse


def run(model: str, steps: int, repeats: int) -> dict:
    registry.quiet_libraries()
    recipe = parse(
        {
            "prompt": "a red circle",
            "experts": [{"model": model}],
            "sampler": {"steps": steps, "num_images": 1},
        },
        check=registry.check_reference,
    )
    cache = registry.ModelCache()
    start = time.perf_counter()
    engine.generate(recipe, cache=cache)
    first = time.perf_counter() - start
    per_image, per_step = [], []
    for _ in range(repeats):
        stamps: list[float] = []
        start = time.perf_counter()
        engine.generate(
            recipe,
            cache=cache,
            progress=lambda d, t, stamps=stamps: stamps.append(time.perf_counter()),
        )
        per_image.append(time.perf_counter() - start)
        per_step += [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "benchmark": "single",
        "device": device_name(),
        "torch": torch.__version__,
        "model": model,
        "steps": steps,
        "repeats": repeats,
        "time_to_first_image_s": round(first, 3),
        "image_s_median": round(statistics.median(per_image), 3),
        "step_ms_median": round(1000 * statistics.median(per_step), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=registry.DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    result = run(args.model, args.steps, args.repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    path = RESULTS / f"single-{kind}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
