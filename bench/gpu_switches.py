"""The GPU speed switches (``composer/speedups.py``) against plain diffusers (issue 18, item 5).

    python -m bench.gpu_switches [--size 512] [--steps 20] [--images 4]
        [--cases channels_last,sdpa,streams]   # which switches ('' for none)
        [--compile default,reduce-overhead]    # modes to try ('' for none; max-autotune is slow)

SD1.5-shaped random weights (``bench.superpose_speed.sd15_pipes``), fp16 on CUDA (fp32 on a CPU,
for a smoke run at a small size). Every case is a fresh copy of the same U-Net and VAE with one
switch applied through ``speedups.prepare`` / ``speedups.attention``, the code the engine runs,
timed as ``StableDiffusionPipeline`` with ``--images`` images in one call against the same call
without switches (median of ``--repeats`` after a warm-up; for ``torch.compile`` the warm-up's
extra seconds are reported as the compile time). Each case also reports its largest pixel
difference from the plain images. Superposition of two checkpoints is timed with and without
``cuda_streams``. Writes ``bench/results/gpu-switches-<cuda|cpu>.json``, keeping the cases an
earlier call measured (``bench/gpu.sh`` measures compile in a call of its own).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from bench import RESULTS
from bench.superpose_speed import sd15_pipes
from composer import registry, speedups
from composer.device import device_name
from pipelines.superposition import SuperpositionPipeline


def clock(fn, device: str) -> tuple[float, object]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def measure(fn, repeats: int, device: str) -> dict:
    first, _ = clock(fn, device)
    times, images = [], None
    for _ in range(repeats):
        seconds, images = clock(fn, device)
        times.append(seconds)
    steady = statistics.median(times)
    return {"seconds": round(steady, 4), "first_call_extra_s": round(first - steady, 2)}, images


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def copy_of(pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    fresh = StableDiffusionPipeline(
        **{**pipe.components, "unet": copy.deepcopy(pipe.unet), "vae": copy.deepcopy(pipe.vae)}
    )
    fresh.set_progress_bar_config(disable=True)
    return fresh


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_switches", description=__doc__)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="channels_last,sdpa,streams")
    parser.add_argument("--compile", default="default,reduce-overhead")
    args = parser.parse_args(argv)
    registry.quiet_libraries()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipes = sd15_pipes(dtype, device)
    for p in pipes:
        p.set_progress_bar_config(disable=True)
    common = {
        "num_inference_steps": args.steps,
        "guidance_scale": 5.0,
        "height": args.size,
        "width": args.size,
    }

    def generators():
        return [torch.Generator(device=device).manual_seed(i) for i in range(args.images)]

    def run(pipe, switches: speedups.Speedups):
        def call():
            with speedups.attention(switches):
                return pipe(
                    "a red circle",
                    num_images_per_prompt=args.images,
                    generator=generators(),
                    **common,
                ).images

        return call

    chosen = set(filter(None, args.cases.split(",")))
    cases: dict[str, speedups.Speedups] = {
        f"compile_{m}": speedups.Speedups(compile=m) for m in args.compile.split(",") if m
    }
    if "channels_last" in chosen:
        cases["channels_last"] = speedups.Speedups(channels_last=True)
    if "sdpa" in chosen:
        cases.update({f"sdpa_{k}": speedups.Speedups(sdpa=k) for k in speedups.SDPA_KERNELS[:3]})
    out: dict = {}
    with torch.inference_mode():
        plain, reference = measure(run(pipes[0], speedups.Speedups()), args.repeats, device)
        out["plain"] = {**plain, "per_image_s": round(plain["seconds"] / args.images, 4)}
        print("plain", json.dumps(out["plain"]), flush=True)
        for name, switches in cases.items():
            pipe = copy_of(pipes[0])
            try:
                speedups.prepare(pipe, switches)
                timing, images = measure(run(pipe, switches), args.repeats, device)
            except Exception as e:  # a kernel this GPU or build lacks: say so, go on
                out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            else:
                out[name] = {
                    **timing,
                    "speedup": round(plain["seconds"] / timing["seconds"], 3),
                    "max_pixel_diff": int(np.abs(pixels(images) - pixels(reference)).max()),
                }
            print(name, json.dumps(out[name]), flush=True)
            del pipe
            if device == "cuda":
                torch.cuda.empty_cache()

        if "streams" in chosen:
            out["superpose_two_checkpoints"] = superposition(pipes, args, common, generators)
            print("superpose", json.dumps(out["superpose_two_checkpoints"]), flush=True)
    path = RESULTS / f"gpu-switches-{device}.json"
    earlier = json.loads(path.read_text())["cases"] if path.exists() else {}
    result = {
        "benchmark": "gpu_switches",
        "device": device_name(),
        "torch": torch.__version__,
        "models": "SD1.5-shaped, random weights",
        "dtype": str(dtype).removeprefix("torch."),
        "size": args.size,
        "steps": args.steps,
        "images": args.images,
        "repeats": args.repeats,
        "cases": {**earlier, **out},
    }
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def superposition(pipes, args, common: dict, generators) -> dict:
    """Two checkpoints superposed, their U-Nets called one after the other or on two streams."""
    device = pipes[0].device.type
    two = SuperpositionPipeline.from_pipes(pipes)
    two.set_progress_bar_config(disable=True)

    def superpose(streams: bool):
        def call():
            return two(
                prompt=["a circle", "a circle"],
                num_images_per_prompt=args.images,
                generator=generators(),
                cuda_streams=streams,
                **common,
            ).images

        return call

    serial, a = measure(superpose(False), args.repeats, device)
    streamed, b = measure(superpose(True), args.repeats, device)
    return {
        "serial_s": serial["seconds"],
        "streams_s": streamed["seconds"],
        "speedup": round(serial["seconds"] / streamed["seconds"], 3),
        "max_pixel_diff": int(np.abs(pixels(a) - pixels(b)).max()),
    }


if __name__ == "__main__":
    main()
