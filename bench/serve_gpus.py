"""Superposition experts over the GPUs of one replica (issue 22), on a machine with GPUs:

    python -m bench.serve_gpus [--experts 3] [--budget-gib B]

Builds ``--experts`` SD1.5-shaped U-Nets (random weights, fp16), places them on the visible GPUs
with ``composer.serve.placement`` (each GPU's budget: ``--budget-gib``, else 90 % of the least
free memory) and times the U-Net work of one superposition step (a CFG batch of 2 at 64×64×4
latents): every U-Net on ``cuda:0`` in turn, against the placement, where the latents go out to
each device and the noise predictions come back to ``cuda:0``, the only traffic between GPUs.
With one GPU, or a placement that fits one, the two are the same and only the first is timed; a
refusal is reported with its message. Writes ``bench/results/serve-gpus-cuda.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from bench import RESULTS
from composer.serve.placement import HEADROOM, GiB, PlacementError, place


def unets(count: int) -> list[torch.nn.Module]:
    """``count`` SD1.5-shaped U-Nets with random weights, on the CPU in fp16."""
    from diffusers import UNet2DConditionModel

    made = []
    for seed in range(count):
        torch.manual_seed(seed)
        made.append(
            UNet2DConditionModel(
                sample_size=64,
                cross_attention_dim=768,
                attention_head_dim=8,
                block_out_channels=(320, 640, 1280, 1280),
            ).to(torch.float16)
        )
    return made


def step_seconds(models, devices: list[str], repeats: int = 10) -> float:
    """Median seconds of one step's U-Net calls, model ``i`` on ``devices[i]``, the latents
    sent from ``cuda:0`` and the predictions gathered back there."""
    home = torch.device("cuda:0")
    latents = torch.randn(2, 4, 64, 64, device=home, dtype=torch.float16)
    text = {d: torch.randn(2, 77, 768, device=d, dtype=torch.float16) for d in set(devices)}
    t = torch.tensor(500, device=home)

    @torch.no_grad()
    def step():
        eps = [
            model(latents.to(d, non_blocking=True), t.to(d), encoder_hidden_states=text[d]).sample
            for model, d in zip(models, devices, strict=True)
        ]
        return [e.to(home, non_blocking=True) for e in eps]

    for model, d in zip(models, devices, strict=True):
        model.to(d)
    step()
    times = []
    for _ in range(repeats):
        for d in set(devices):
            torch.cuda.synchronize(d)
        start = time.perf_counter()
        step()
        for d in set(devices):
            torch.cuda.synchronize(d)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--budget-gib", type=float, help="per GPU (default: 90 %% of the least free)")
    args = p.parse_args(argv)
    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("bench.serve_gpus needs CUDA GPUs")
    free = [torch.cuda.mem_get_info(i)[0] for i in range(gpus)]
    budget = int(args.budget_gib * GiB) if args.budget_gib else int(0.9 * min(free))
    models = unets(args.experts)
    needs = {
        f"unet{i}": math.ceil(sum(p.numel() * 2 for p in m.parameters()) * HEADROOM)
        for i, m in enumerate(models)
    }
    report = {
        "devices": [torch.cuda.get_device_name(i) for i in range(gpus)],
        "free_gib": [round(f / GiB, 1) for f in free],
        "budget_gib": round(budget / GiB, 2),
        "experts": args.experts,
        "need_gib": {name: round(n / GiB, 2) for name, n in needs.items()},
    }
    report["one_device_step_s"] = round(step_seconds(models, ["cuda:0"] * len(models)), 4)
    try:
        placed = place(needs, budget, gpus)
    except PlacementError as e:
        report["refused"] = str(e)
    else:
        report["placement"] = dict(placed.device)
        devices = [placed.device[name] for name in needs]
        if len(set(devices)) > 1:
            report["placed_step_s"] = round(step_seconds(models, devices), 4)
            remote = sum(d != "cuda:0" for d in devices)
            report["bytes_between_gpus_per_step"] = remote * 2 * (2 * 4 * 64 * 64) * 2
    out = RESULTS / "serve-gpus-cuda.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
