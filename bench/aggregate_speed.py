"""Time per image of AFA relative to one expert, in the same run on the same device (issue 7).

    python -m bench.aggregate_speed                               # toy zoo: toy-warm + toy-cool
    python -m bench.aggregate_speed --sd15 --size 512 [--dtype float16]   # SD1.5-shaped, random

Compares one expert's ``StableDiffusionPipeline``, uniform feature averaging and AFA
(``AggregationPipeline``; for the zoo the bundled ``toy-warm-cool`` aggregator, for SD1.5 shapes
a fresh aggregator of the default configuration — its cost does not depend on its weights), all
with CFG, median of ``--repeats`` images after a warm-up. Writes
``bench/results/aggregate-speed-<cpu|cuda>[-sd15].json``; issue 7's target: AFA ≤ 2.5× one
expert for two experts with CFG.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from bench import RESULTS
from bench.superpose_speed import sd15_pipes, timed, zoo_pipes
from composer.device import device_name
from pipelines.aggregation import AggregationPipeline, Aggregator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aggregate_speed", description=__doc__)
    parser.add_argument("--sd15", action="store_true", help="SD1.5-shaped random weights")
    parser.add_argument("--size", type=int, default=None, help="image side (default: native)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--aggregator", default="assets/aggregators/toy-warm-cool")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    pipes = sd15_pipes(dtype, device) if args.sd15 else zoo_pipes(device)
    unets = [p.unet for p in pipes]
    if args.sd15:
        aggregator = Aggregator.for_unets(unets).to(device, dtype)
    else:
        aggregator = Aggregator.from_pretrained(args.aggregator).to(device, dtype)
    size = args.size or pipes[0].unet.config.sample_size * pipes[0].vae_scale_factor
    runs = {
        "one expert": pipes[0],
        "uniform feature averaging": AggregationPipeline.from_pipes(pipes),
        "afa": AggregationPipeline.from_pipes(pipes, aggregator),
    }
    seconds = {}
    for name, pipe in runs.items():
        pipe.set_progress_bar_config(disable=True)

        def one_image(pipe=pipe):
            generator = torch.Generator(device).manual_seed(0)
            pipe("a red circle", num_inference_steps=args.steps, guidance_scale=5.0,
                 height=size, width=size, generator=generator)  # fmt: skip

        seconds[name] = round(timed(one_image, args.repeats, device), 4)
        print(name, seconds[name], flush=True)
    result = {
        "benchmark": "AFA time per image relative to one expert (issue 7)",
        "device": device_name(),
        "dtype": args.dtype,
        "models": "SD1.5-shaped, random weights" if args.sd15 else "toy-warm, toy-cool",
        "aggregator": "default configuration"
        if args.sd15
        else {"path": args.aggregator, **dict(aggregator.config)},
        "aggregator_parameters": sum(p.numel() for p in aggregator.parameters()),
        "unet_parameters": sum(p.numel() for p in unets[0].parameters()),
        "size": size,
        "steps": args.steps,
        "guidance_scale": 5.0,
        "repeats": args.repeats,
        "load_average_before": list(os.getloadavg()),
        "seconds_per_image": seconds,
        "afa_over_one_expert": round(seconds["afa"] / seconds["one expert"], 3),
        "uniform_over_one_expert": round(
            seconds["uniform feature averaging"] / seconds["one expert"], 3
        ),
        "target": "afa_over_one_expert <= 2.5",
    }
    path = RESULTS / f"aggregate-speed-{device}{'-sd15' if args.sd15 else ''}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds_per_image", "afa_over_one_expert")}))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
