"""What a data-free Fisher estimate costs (issue 23): measured on the toy zoo, projected for
SD1.5.

``merge.fisher.unet_fisher`` draws N samples x₀ with the model itself (``steps`` steps, CFG:
2 U-Net rows per step), then runs one forward and one backward pass per sample. So per model

    seconds ≈ N · (steps · t_sample_step + t_forward_backward)

and memory ≈ weights + gradients + one fp32 accumulator per parameter (3 × 3.4 GB for SD1.5's
860 M U-Net parameters in fp32). The toy row measures the whole estimate and its two parts; the
SD1.5 row measures one sampling step (batch 2, 64² latents) and one forward + backward (batch 1)
of a U-Net of SD1.5's shape with random weights (nothing downloaded), and projects N samples.
The estimate is computed once per model and setting and cached (``merge.fisher
.cached_unet_fisher``); a later merge reads the cache and runs no backward pass.

    python -m bench.fisher_speed            # toy + sd15 (the sd15 row needs ~12 GB of RAM)
    python -m bench.fisher_speed --toy-only

Writes ``bench/results/fisher-speed-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from bench import RESULTS
from composer import registry
from composer.device import device_name
from composer.merge.fisher import unet_fisher

N = 32
STEPS = 20


def toy(device: str) -> dict:
    """The whole estimate of toy-warm (N samples drawn, N forward + backward passes), and the
    forward + backward pass alone, timed right after it (8 passes at the estimate's shapes)."""
    pipe = registry.load_pipeline(
        registry.resolve_model("toy-warm"), torch.device(device), torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    fisher = unet_fisher(pipe, ["a red circle"], n=N, steps=STEPS)
    total = time.perf_counter() - start
    unet, size = pipe.unet, pipe.unet.config.sample_size
    latents = torch.randn(1, unet.config.in_channels, size, size, device=device)
    embeds = pipe.encode_prompt("a red circle", device, 1, False)[0]
    t = torch.tensor([500], device=device)
    start = time.perf_counter()
    for _ in range(8):
        out = unet(latents, t, encoder_hidden_states=embeds).sample
        torch.autograd.grad((out * torch.randn_like(out)).sum(), list(unet.parameters()))
    backward = (time.perf_counter() - start) / 8
    return {
        "model": "toy-warm",
        "parameters": sum(v.numel() for v in fisher.values()),
        "samples": N,
        "steps": STEPS,
        "seconds": round(total, 2),
        "forward_backward_seconds_per_sample": round(backward, 4),
        "sampling_seconds": round(total - N * backward, 2),
    }


def sd15(device: str) -> dict:
    from diffusers import UNet2DConditionModel

    from bench.merge_speed import unet_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(unet_config("sd15")).to(device)
    params = sum(p.numel() for p in unet.parameters())
    latents = torch.randn(2, 4, 64, 64, device=device)
    context = torch.randn(2, 77, 768, device=device)
    t = torch.tensor([500], device=device)
    with torch.no_grad():
        unet(latents, t, encoder_hidden_states=context)  # warm-up
        start = time.perf_counter()
        unet(latents, t, encoder_hidden_states=context)
        step = time.perf_counter() - start
    u = torch.randn(1, 4, 64, 64, device=device)
    start = time.perf_counter()
    out = unet(latents[:1], t, encoder_hidden_states=context[:1]).sample
    (out * u).sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    backward = time.perf_counter() - start
    per_sample = STEPS * step + backward
    return {
        "model": "U-Net of SD1.5's shape, random weights, fp32, 512² (64² latents)",
        "parameters": params,
        "sampling_step_seconds": round(step, 2),
        "forward_backward_seconds": round(backward, 2),
        "projected_seconds_per_sample": round(per_sample, 1),
        f"projected_minutes_for_{N}_samples": round(N * per_sample / 60, 1),
        "accumulator_gb": round(params * 4 / 1e9, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy-only", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    result = {
        "benchmark": "fisher_speed",
        "device": device_name(torch.device(args.device)),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "note": "on a CPU shared with other jobs the seconds are upper bounds",
        "toy": toy(args.device),
    }
    path = RESULTS / f"fisher-speed-{args.device.split(':')[0]}.json"
    if not args.toy_only:
        result["sd15"] = sd15(args.device)
    elif path.is_file():  # keep the last SD1.5 row
        result["sd15"] = json.loads(path.read_text()).get("sd15")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
