"""Measure what a toy model draws: generate over many seeds, count with the evaluator.

    python -m toyworld.measure [--seeds 64] [--json]

Each check is a recipe (model + LoRAs + prompt) and the colour and/or shape the prompt names;
an image passes a check when the evaluator finds every named attribute. The same checks write the
model cards' accuracy tables and, on fewer seeds, guard the zoo in the test suite.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass

from composer import engine, registry
from composer.recipe import MAX_IMAGES, parse
from toyworld.evaluate import classify


@dataclass(frozen=True)
class Check:
    model: str
    prompt: str
    color: str | None
    shape: str | None
    loras: tuple[str, ...] = ()
    threshold: float = 0.9


CHECKS = (
    Check("toy-base", "a gray triangle", "gray", "triangle"),
    Check("toy-base", "a gray circle", "gray", "circle"),
    Check("toy-base", "a square", None, "square"),
    Check("toy-warm", "a red circle", "red", "circle"),
    Check("toy-warm", "a yellow square", "yellow", "square"),
    Check("toy-warm", "a yellow shape", "yellow", None),
    Check("toy-warm", "a triangle", None, "triangle"),
    Check("toy-cool", "a blue square", "blue", "square"),
    Check("toy-cool", "a green triangle", "green", "triangle"),
    Check("toy-cool", "a green shape", "green", None),
    Check("toy-cool", "a circle", None, "circle"),
    # prior preservation: a fine-tune draws the colours it does not own as the base does (gray)
    Check("toy-warm", "a blue square", "gray", "square"),
    Check("toy-cool", "a red circle", "gray", "circle"),
    Check("toy-base", "a purple circle", "purple", "circle", ("toy-purple",), 0.8),
    Check("toy-base", "a gray star", None, "star", ("toy-star",), 0.8),
)
DEFAULT_SAMPLER = {"scheduler": "euler", "steps": 20, "guidance_scale": 5.0}


def generate_labels(
    recipe: dict, seeds: int, cache: registry.ModelCache | None = None
) -> tuple[list[tuple[str, str]], float]:
    """Run recipe JSON ``recipe`` with seeds 0 … seeds-1 (in recipes of ≤ 16 images) and return
    the evaluator's (colour, shape) per image and the seconds spent sampling."""
    images, seconds = [], 0.0
    for start in range(0, seeds, MAX_IMAGES):
        sampler = {**recipe.get("sampler", {}), "seed": start}
        sampler["num_images"] = min(MAX_IMAGES, seeds - start)
        parsed = parse({**recipe, "sampler": sampler}, check=registry.check_reference)
        result = engine.generate(parsed, cache=cache)
        images += result.images
        seconds += sum(result.seconds)
    return [classify(image) for image in images], seconds


def measure(
    check: Check, seeds: int, cache: registry.ModelCache | None = None, sampler: dict | None = None
) -> dict:
    """Generate ``seeds`` images for ``check`` and count what the evaluator sees."""
    recipe = {
        "prompt": check.prompt,
        "experts": [
            {"model": check.model, "loras": [{"path": p, "weight": 1.0} for p in check.loras]}
        ],
        "sampler": {**DEFAULT_SAMPLER, **(sampler or {})},
    }
    labels, seconds = generate_labels(recipe, seeds, cache)
    passed = sum(
        (check.color is None or c == check.color) and (check.shape is None or s == check.shape)
        for c, s in labels
    )
    return {
        "model": check.model,
        "loras": list(check.loras),
        "prompt": check.prompt,
        "expect": {"color": check.color, "shape": check.shape},
        "n": seeds,
        "accuracy": passed / seeds,
        "threshold": check.threshold,
        "colors": dict(Counter(c for c, _ in labels)),
        "shapes": dict(Counter(s for _, s in labels)),
        "seconds_per_image": seconds / seeds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m toyworld.measure", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seeds", type=int, default=64)
    parser.add_argument("--model", help="only the checks of this model")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    registry.quiet_libraries()
    cache = registry.ModelCache()
    rows = [measure(c, args.seeds, cache) for c in CHECKS if args.model in (None, c.model)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        lora = "+" + "+".join(row["loras"]) if row["loras"] else ""
        print(
            f"{row['model'] + lora:<22} {row['prompt']!r:<22} {row['accuracy']:6.1%} "
            f"(≥ {row['threshold']:.0%})  colours {row['colors']}  shapes {row['shapes']}"
        )


if __name__ == "__main__":
    main()
