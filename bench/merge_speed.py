"""Merge speed and memory (issue 5): live re-merge, streamed export, and a plain baseline.

    python -m bench.merge_speed [--arch sd15|sdxl|toy] [--keep DIR]

The benchmark makes its own checkpoints: three random fp16 U-Nets of the architecture's shape
(two experts and a base, diffusers folders with a shared toy VAE/text encoder, so nothing is
downloaded), then measures on this machine's device:

- ``live_ties_s`` / ``live_weighted_sum_s``: the live merge into the scratch U-Net with the
  sources already loaded (what moving a slider and generating again costs);
- ``export_*_s`` and ``export_*_peak_anon_mib``: ``composer.merge.export`` for a 2-model
  weighted sum and a 3-model TIES, with the peak anonymous (non-file-backed) RSS sampled every
  10 ms — the memory-mapped inputs are page cache, not anonymous memory;
- ``baseline_*``: the plain loop other tools run (load every state dict fully, merge, save with
  ``safetensors.torch.save_file``), same inputs, for the ratio.

Targets on a lent H100 (issue 5): TIES of an SD1.5 U-Net in VRAM ≤ 1 s; live re-merge < 200 ms;
SDXL 2-model export ≤ 8 s with < 1 GB anonymous RAM from a warm page cache.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from bench.single import RESULTS, device_name
from composer import registry
from composer.merge import methods
from composer.merge.export import export
from composer.merge.live import merged_unet
from composer.recipe import Merge, parse

ARCHS = {
    "sd15": {"cross_attention_dim": 768, "block_out_channels": (320, 640, 1280, 1280)},
    "sdxl": {
        "sample_size": 128,
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
}


def anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakAnon:
    """Peak anonymous RSS (MiB) above the level at entry, sampled every 10 ms."""

    def __enter__(self):
        self.start, self.peak, self._stop = anon_mib(), 0.0, threading.Event()

        def sample():
            while not self._stop.wait(0.01):
                self.peak = max(self.peak, anon_mib() - self.start)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def make_models(arch: str, folder: Path) -> list[str]:
    """Three diffusers folders (``base``, ``a``, ``b``) with random fp16 U-Nets of ``arch``; a and
    b are the base plus independent noise (task vectors), VAE/text encoder from the toy zoo."""
    toy = registry.bundled("models")["toy-base"]
    if arch == "toy":
        config = dict(UNet2DConditionModel.load_config(toy / "unet"))
    else:
        config = dict(UNet2DConditionModel.load_config(toy / "unet"))
        config.update(
            {
                "sample_size": 64,
                "in_channels": 4,
                "out_channels": 4,
                "layers_per_block": 2,
                "down_block_types": (
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "DownBlock2D",
                ),
                "up_block_types": (
                    "UpBlock2D",
                    "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D",
                ),
                "attention_head_dim": 8,
                "norm_num_groups": 32,
                "transformer_layers_per_block": 1,
            }
        )
        config.update(ARCHS[arch])
    torch.manual_seed(0)
    base = UNet2DConditionModel.from_config(config).half()
    names = []
    for name, noise in (("base", 0.0), ("a", 0.01), ("b", 0.01)):
        out = folder / name
        shutil.copytree(toy, out, symlinks=False, ignore=shutil.ignore_patterns("unet"))
        unet = base
        if noise:
            unet = UNet2DConditionModel.from_config(config).half()
            unet.load_state_dict(
                {k: v + noise * torch.randn_like(v) for k, v in base.state_dict().items()}
            )
        unet.save_pretrained(out / "unet")
        names.append(str(out))
    return names


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.merge_speed")
    parser.add_argument("--arch", choices=["toy", "sd15", "sdxl"], default="sd15")
    parser.add_argument("--keep", type=Path, help="make the models here (and keep them)")
    args = parser.parse_args(argv)
    registry.quiet_libraries()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="merge-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    base, a, b = (
        [str(folder / n) for n in ("base", "a", "b")]
        if (folder / "b" / "unet").is_dir()
        else make_models(args.arch, folder)
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    result = {"benchmark": "merge speed", "device": device_name(), "arch": args.arch}

    unets = {
        n: UNet2DConditionModel.from_pretrained(p, subfolder="unet", torch_dtype=dtype).to(device)
        for n, p in (("base", base), ("a", a), ("b", b))
    }
    result["unet_params_m"] = round(sum(p.numel() for p in unets["a"].parameters()) / 1e6, 1)
    for label, settings, with_base in (
        ("weighted_sum", Merge("weighted_sum"), False),
        ("ties", Merge("ties", base="base", density=0.2), True),
    ):
        times = []
        for i in range(4):  # the first also builds the scratch U-Net; each weight is a new merge
            experts = [("a", unets["a"], 1.0), ("b", unets["b"], 1.0 + 0.01 * i)]
            with merged_unet(
                settings, experts, ("base", unets["base"]) if with_base else None
            ) as live:
                times.append(live.seconds)
        result[f"live_{label}_s"] = round(min(times[1:]), 4)
    del unets

    for label, recipe in (
        (
            "weighted_sum_2",
            {"experts": [{"model": a}, {"model": b}], "merge": {"method": "weighted_sum"}},
        ),
        (
            "ties_3",
            {
                "experts": [{"model": a}, {"model": b}, {"model": base}],
                "merge": {"method": "ties", "base": base, "density": 0.2},
            },
        ),
    ):
        parsed = parse({"prompt": "", "method": "merge", **recipe})
        out = folder / f"{label}.safetensors"
        export(parsed, out, "fp16")  # warm the page cache
        with PeakAnon() as peak:
            seconds = timed(lambda parsed=parsed, out=out: export(parsed, out, "fp16"))
        result[f"export_{label}_s"] = round(seconds, 3)
        result[f"export_{label}_peak_anon_mib"] = round(peak.peak, 1)

        def baseline(recipe=recipe, out=out):
            paths = [m["model"] for m in recipe["experts"]]
            states = [load_file(f"{p}/unet/diffusion_pytorch_model.safetensors") for p in paths]
            if recipe["merge"]["method"] == "ties":
                base_sd = load_file(f"{base}/unet/diffusion_pytorch_model.safetensors")
                merged = {
                    k: methods.ties(base_sd[k].float(), [s[k].float() for s in states], 0.2).half()
                    for k in states[0]
                }
            else:
                merged = {
                    k: methods.weighted_sum([s[k].float() for s in states]).half()
                    for k in states[0]
                }
            save_file(merged, str(out) + ".baseline")

        with PeakAnon() as peak:
            seconds = timed(baseline)
        result[f"baseline_{label}_s"] = round(seconds, 3)
        result[f"baseline_{label}_peak_anon_mib"] = round(peak.peak, 1)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"merge-speed-{args.arch}-{device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
