"""The engine's cost over plain diffusers, batches against one image at a time (issue 18).

    python -m bench.engine_overhead [--steps 20] [--repeats 5]   # toy zoo, times and invariance
    python -m bench.engine_overhead --memory       # calibrate batches.ACTIVATION_FACTOR

Times, alternating in one process (so load on a shared machine hits both sides alike), the
engine's recipe against ``StableDiffusionPipeline`` called once with the same generators
(toy-warm, Euler, CFG 5, native size): ``single`` with 4 and 8 images, and with 4 images
superposition of two prompts on one model, of two checkpoints, and AFA of two experts. Each also
with ``batch_size`` 1 (the engine before batches). Targets on CPU: single ≤ 1.05×, two prompts
≤ 1.5× (one U-Net call of 3·4 rows against 2·4), two checkpoints ≤ 2.1×, AFA ≤ 2.3× (also
timed without its aggregator, which shows what the experts cost and what the aggregator adds).

It also measures batch invariance: image i of a batch against the same seed alone, as floats and
as 8-bit pixels. ``--memory`` measures the resident memory an SD1.5-shaped U-Net pass (random
weights, fp32, 256²) adds per image, in fresh processes, which is what ``ACTIVATION_FACTOR``
rests on. Writes ``bench/results/engine-overhead-<cpu|cuda>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from bench import RESULTS
from composer import engine, registry
from composer.device import device_name
from composer.recipe import parse
from composer.schedulers import make_scheduler

CASES = {
    "single_4": ({"experts": [{"model": "toy-warm"}]}, 4),
    "single_8": ({"experts": [{"model": "toy-warm"}]}, 8),
    "superpose_prompts_4": (
        {
            "method": "superpose",
            "experts": [
                {"model": "toy-warm", "prompt": "a red circle"},
                {"model": "toy-warm", "prompt": "a yellow square"},
            ],
        },
        4,
    ),
    "superpose_models_4": (
        {
            "method": "superpose",
            "experts": [
                {"model": "toy-warm", "prompt": "a red circle"},
                {"model": "toy-cool", "prompt": "a blue square"},
            ],
        },
        4,
    ),
    "aggregate_4": (
        {
            "method": "aggregate",
            "experts": [{"model": "toy-warm"}, {"model": "toy-cool"}],
            "aggregate": {"aggregator": "toy-warm-cool"},
        },
        4,
    ),
    "aggregate_uniform_4": (  # the experts' share of AFA's cost, without the aggregator's
        {
            "method": "aggregate",
            "experts": [{"model": "toy-warm"}, {"model": "toy-cool"}],
            "aggregate": {"aggregator": None},
        },
        4,
    ),
}


def recipe(case: str, steps: int, batch_size: int | None):
    body, n = CASES[case]
    sampler = {"steps": steps, "num_images": n, "seed": 0, "batch_size": batch_size}
    return parse({"prompt": "a red circle", **body, "sampler": sampler})


def vanilla(cache, n: int, steps: int):
    """The plain diffusers pipeline of toy-warm, called once with n generators."""
    with cache.lease(registry.resolve_model("toy-warm")) as lease:
        pipe = type(lease.pipe).from_pipe(
            lease.pipe, scheduler=make_scheduler("euler", lease.pipe.scheduler.config)
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            "a red circle",
            num_inference_steps=steps,
            guidance_scale=5.0,
            num_images_per_prompt=n,
            generator=[torch.Generator().manual_seed(i) for i in range(n)],
        ).images


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed(steps: int, repeats: int) -> dict:
    cache = registry.ModelCache()
    out = {}
    for case, (_, n) in CASES.items():
        batched, alone = recipe(case, steps, None), recipe(case, steps, 1)
        engine.generate(batched, cache=cache)  # warm: load, first-call allocations
        vanilla(cache, n, steps)
        runs = {"vanilla": [], "batched": [], "one_by_one": []}
        for _ in range(repeats):
            runs["vanilla"].append(timed(lambda n=n: vanilla(cache, n, steps)))
            runs["batched"].append(timed(lambda r=batched: engine.generate(r, cache=cache)))
            runs["one_by_one"].append(timed(lambda r=alone: engine.generate(r, cache=cache)))
        median = {k: statistics.median(v) for k, v in runs.items()}
        out[case] = {
            "images": n,
            **{f"{k}_s": round(v, 3) for k, v in median.items()},
            "ratio": round(median["batched"] / median["vanilla"], 3),
            "ratio_batch_1": round(median["one_by_one"] / median["vanilla"], 3),
        }
        print(case, json.dumps(out[case]), flush=True)
    return out


def invariance(steps: int) -> dict:
    """Image i of a batch of 4 against seed i alone, per method and a stochastic sampler."""
    cache = registry.ModelCache()
    out = {}
    for case in ("single_4", "superpose_models_4", "aggregate_4"):
        for scheduler in ("euler", "euler_a"):
            made = {}
            for batch_size in (None, 1):
                r = recipe(case, steps, batch_size)
                sampler = {**r.to_dict()["sampler"], "scheduler": scheduler}
                r = parse({**r.to_dict(), "sampler": sampler})
                made[batch_size] = engine.generate(r, cache=cache).images
            diff = [
                np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
                for a, b in zip(made[None], made[1], strict=True)
            ]
            out[f"{case}_{scheduler}"] = {
                "u8_max": int(max(d.max() for d in diff)),
                "u8_share_differing": round(float(np.mean([(d > 0).mean() for d in diff])), 6),
                "bit_identical": all(int(d.max()) == 0 for d in diff),
            }
    return out


MEMORY_PROBE = """
import resource, sys, torch
from diffusers import UNet2DConditionModel
torch.manual_seed(0)
cuda = torch.cuda.is_available()
unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8).eval()
if cuda:
    unet = unet.to("cuda", torch.float16)
b, side = int(sys.argv[1]), int(sys.argv[2]) // 8
x = torch.randn(b, 4, side, side).to(unet.device, unet.dtype)
c = torch.randn(b, 77, 768).to(unet.device, unet.dtype)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = torch.cuda.memory_allocated() if cuda else rss()
with torch.no_grad():
    unet(x, 500, c)
after = torch.cuda.max_memory_allocated() if cuda else rss()
print(after - before)
"""


def memory() -> dict:
    """Peak memory one SD1.5-shaped U-Net pass adds, per batch size (fresh processes; resident
    memory on CPU in fp32, allocated memory on CUDA in fp16), and the factor per latent cell ×
    widest channels × bytes per weight that one more image costs."""
    cuda = torch.cuda.is_available()
    itemsize = 2 if cuda else 4
    out = {"unet": f"SD1.5-shaped, random weights, {'fp16' if cuda else 'fp32'}, no grad"}
    for side, sizes in ((256, (1, 4, 8)), (512, (1, 4) if not cuda else (1, 4, 8))):
        grown = {}
        for b in sizes:
            run = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(b), str(side)],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            grown[b] = int(run.stdout.strip().splitlines()[-1])
        per_image = (grown[sizes[-1]] - grown[1]) / (sizes[-1] - 1)
        cells = (side // 8) ** 2
        out[f"{side}px"] = {
            "peak_growth_bytes": grown,
            "bytes_per_image": round(per_image),
            "factor": round(per_image / (cells * 1280 * itemsize), 1),
            "factor_with_first_image": round(grown[1] / (cells * 1280 * itemsize), 1),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help="only calibrate the memory factor")
    args = parser.parse_args()
    registry.quiet_libraries()
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    path = RESULTS / f"engine-overhead-{kind}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update(benchmark="engine_overhead", device=device_name(), torch=torch.__version__)
    if args.memory:
        result["memory"] = memory()
    else:
        started = time.perf_counter()
        result.update(steps=args.steps, repeats=args.repeats, cases=speed(args.steps, args.repeats))
        result["invariance"] = invariance(args.steps)
        result["minutes"] = round((time.perf_counter() - started) / 60, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
