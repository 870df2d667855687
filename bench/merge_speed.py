"""Merge speed and memory (issue 5): live re-merge, streamed export, and a plain baseline.

    python -m bench.merge_speed [--arch toy|sd15|sdxl] [--repeats 3] [--keep DIR] [--cases ...]

The benchmark makes its own checkpoints: three random fp16 models of the architecture's shape,
``base`` and two experts ``a`` and ``b`` (the base plus independent noise, so they have task
vectors), written tensor by tensor as diffusers folders: U-Net and text encoder(s) of the real
shapes (SD 1.5: CLIP ViT-L; SDXL: CLIP ViT-L and OpenCLIP ViT-bigG), which a merge computes,
and the toy zoo's VAE, which it copies (nothing is downloaded; ``toy`` keeps the toy zoo's text
encoder, the same in all three). Then, on this machine's device, each timing ``--repeats``
times, reporting the median:

- ``live``: the live merge into the scratch modules with the sources already loaded (the first
  merge also builds them and is reported apart as ``first_s``; every later one changes a
  weight, so it is a new merge: what moving a slider and generating again costs); ``s`` is the
  whole model (what the page does), ``unet_s`` the U-Net alone (the issue's TIES target);
- ``export``: ``composer.export`` to fp16 (the first run warms the page cache and is not
  timed; each timed run hashes its inputs for ``__metadata__`` as every CLI export does);
- ``baseline``: the plain loop other tools run (load every state dict fully, merge, save with
  ``safetensors.torch.save_file``), same inputs and components, for the ratios.

Each of these runs in a fresh process, whose ``peak_anon_mib`` is its peak anonymous
(non-file-backed) RSS above the level after the imports, sampled every 10 ms from
/proc/self/status: memory-mapped inputs are page cache, not anonymous memory, and a fresh process
cannot reuse heap that an earlier measurement freed.

Two cases: a 2-model weighted sum (inputs a, b) and a 3-model TIES (experts a, b over base,
density 0.2). A measurement whose estimated memory does not fit in this machine's available RAM
is skipped and says so. The load average is recorded before and after each case: other jobs
share the CPU. ``--cases`` measures some cases again and keeps the others of the results file.

Targets on a lent H100 (issue 5): TIES of an SD1.5 U-Net in VRAM ≤ 1 s; live re-merge < 200 ms;
SDXL 2-model export ≤ 8 s with < 1 GB anonymous RAM from a warm page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from bench import RESULTS
from composer import registry
from composer.checkpoints import hashing
from composer.checkpoints.writer import StreamingWriter
from composer.device import device_name
from composer.export import export
from composer.merge import methods
from composer.merge.live import merged_model
from composer.merge.registry import Merge
from composer.recipe import parse

SD15 = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "cross_attention_dim": 768,
    "transformer_layers_per_block": 1,
    "use_linear_projection": False,
}
SDXL = {
    **SD15,
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
}
NOISE = 0.01
"""Task-vector scale: each expert is the base plus this much standard normal noise."""


CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}
OPEN_CLIP_BIG_G = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
TEXT_ENCODERS = {
    "toy": {},
    "sd15": {"text_encoder": ("CLIPTextModel", CLIP_L)},
    "sdxl": {
        "text_encoder": ("CLIPTextModel", CLIP_L),
        "text_encoder_2": ("CLIPTextModelWithProjection", OPEN_CLIP_BIG_G),
    },
}
"""The text encoders a benchmark model gets: transformers class and config (vocabulary 49,408,
77 positions, as SD's)."""


def text_encoder(arch: str, component: str, device: str = "meta"):
    import transformers

    name, config = TEXT_ENCODERS[arch][component]
    full = transformers.CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, architectures=[name], **config
    )
    with torch.device(device):
        return getattr(transformers, name)(full)


def unet_config(arch: str) -> dict:
    toy = registry.bundled("models")["toy-base"]
    config = dict(UNet2DConditionModel.load_config(toy / "unet"))
    config.update({"sd15": SD15, "sdxl": SDXL}.get(arch, {}))
    return config


def anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _meminfo(field: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def available_mib() -> float:
    return _meminfo("MemAvailable")


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
    """Folders ``base``, ``a``, ``b``: random fp16 U-Nets and text encoders of ``arch``, θ_a =
    θ_base + ε·N(0, 1) (likewise b), written one tensor at a time (an SDXL U-Net in fp32 would
    not fit in RAM three times); the VAE (and, for ``toy``, the text encoder) is the toy zoo's."""
    toy = registry.bundled("models")["toy-base"]
    with torch.device("meta"):
        meta = UNet2DConditionModel.from_config(unet_config(arch))
    modules = {"unet": (meta, "diffusion_pytorch_model.safetensors")}
    for component in TEXT_ENCODERS[arch]:
        modules[component] = (text_encoder(arch, component), "model.safetensors")
    names = ("base", "a", "b")
    for name in names:
        shutil.copytree(toy, folder / name, ignore=shutil.ignore_patterns(*modules))
    gen = torch.Generator().manual_seed(0)
    for component, (module, file) in modules.items():
        shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        entries = [(k, torch.float16, s) for k, s in shapes.items()]
        writers = []
        for name in names:
            if component == "unet":
                module.save_config(folder / name / component)
            else:
                module.config.save_pretrained(folder / name / component)
            path = folder / name / component / file
            writers.append(StreamingWriter(path, entries, {"format": "pt"}))
        for key, shape in shapes.items():
            base = 0.02 * torch.randn(shape, generator=gen)
            for name, writer in zip(names, writers, strict=True):
                noise = NOISE * torch.randn(shape, generator=gen) if name != "base" else 0.0
                writer.write(key, (base + noise).half())
        for writer in writers:
            writer.close()
    return [str(folder / n) for n in names]


def model_mib(folder: Path) -> float:
    """The size of one model's merged weights (U-Net and text encoders) in fp16."""
    model = folder / "a"
    files = [*model.glob("unet/*.safetensors"), *model.glob("text_encoder*/*.safetensors")]
    return sum(f.stat().st_size for f in files) / 2**20


def timed(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_of(seconds: list[float]) -> dict:
    return {"s": round(statistics.median(seconds), 3), "s_runs": [round(s, 3) for s in seconds]}


def fits(need_mib: float) -> str | None:
    """None when ``need_mib`` fits in 80 % of the available RAM, else why it is skipped."""
    have = available_mib()
    if need_mib <= 0.8 * have:
        return None
    return f"skipped: needs about {need_mib / 1024:.1f} GiB, {have / 1024:.1f} GiB available"


CASES = {
    "weighted_sum_2": (Merge("weighted_sum"), False),
    "ties_3": (Merge("ties", base="base", density=0.2), True),
}


def model_paths(folder: Path) -> dict[str, str]:
    return {n: str(folder / n) for n in ("base", "a", "b")}


def live_case(folder: Path, label: str, repeats: int) -> dict:
    """Live merges with the sources loaded as the registry loads them (fp16 on CUDA, fp32 on the
    CPU): the first builds the scratch modules, each later one changes a weight (a new merge).
    First the U-Net alone, then the whole model (U-Net and text encoders)."""
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    settings, with_base = CASES[label]
    models = {}
    for n, p in model_paths(folder).items():
        if with_base or n != "base":
            unet = UNet2DConditionModel.from_pretrained(p, subfolder="unet", torch_dtype=dtype)
            models[n] = {"unet": unet}
            for component in sorted(Path(p).glob("text_encoder*")):
                config = json.loads((component / "config.json").read_text())
                cls = getattr(transformers, config["architectures"][0])
                models[n][component.name] = cls.from_pretrained(component, dtype=dtype)
            models[n] = {c: m.to(device) for c, m in models[n].items()}

    def loop(components: list[str]) -> list[float]:
        pick = {n: {c: m[c] for c in components} for n, m in models.items()}
        base = ("base", pick["base"]) if with_base else None
        times = []
        for i in range(repeats + 1):
            experts = [("a", pick["a"], 1.0), ("b", pick["b"], 1.0 + 0.01 * i)]
            with merged_model(settings, experts, base) as merged:
                times.append(merged.seconds)
        return times

    unet = loop(["unet"])
    whole = loop(list(models["a"]))
    return {
        "first_s": round(whole[0], 3),
        **median_of(whole[1:]),
        "unet_s": round(statistics.median(unet[1:]), 3),
        "components": list(models["a"]),
    }


def export_recipe(folder: Path, label: str) -> dict:
    settings, with_base = CASES[label]
    paths = model_paths(folder)
    merge = {"method": settings.method}
    if with_base:
        merge |= {"base": paths["base"], "density": settings.density}
    return {
        "prompt": "",
        "method": "merge",
        "experts": [{"model": paths["a"]}, {"model": paths["b"]}],
        "merge": merge,
    }


def export_case(folder: Path, label: str, repeats: int) -> dict:
    """``composer.export`` to fp16; the first run warms the page cache and is not timed.
    Each timed run hashes its inputs again (sha256 for ``__metadata__``), as every CLI export
    does; ``hash_s`` is that part alone."""
    parsed = parse(export_recipe(folder, label))
    target = folder / f"{label}.safetensors"
    export(parsed, target, "fp16")

    def run() -> None:
        hashing._HASHES.clear()
        export(parsed, target, "fp16")

    seconds = [timed(run) for _ in range(repeats)]
    target.unlink()
    hashing._HASHES.clear()
    files = [
        Path(p) / "unet" / "diffusion_pytorch_model.safetensors"
        for p in model_paths(folder).values()
    ]
    used = files if CASES[label][1] else files[1:]
    hash_s = timed(lambda: [hashing.file_sha256(f) for f in used])
    return {**median_of(seconds), "hash_s": round(hash_s, 3)}


def baseline(folder: Path, settings: Merge, out: Path) -> None:
    """Load every input's U-Net and text encoders fully, merge in fp32 per tensor, save in fp16."""
    paths = model_paths(folder)

    def state(name: str) -> dict[str, torch.Tensor]:
        model = Path(paths[name])
        files = [*model.glob("unet/*.safetensors"), *model.glob("text_encoder*/*.safetensors")]
        return {f"{f.parent.name}.{k}": v for f in files for k, v in load_file(f).items()}

    states = [state(n) for n in "ab"]
    if settings.method == "ties":
        base = state("base")
        merged = {
            k: methods.ties(base[k].float(), [s[k].float() for s in states], 0.2).half()
            for k in states[0]
        }
    else:
        merged = {k: methods.weighted_sum([s[k].float() for s in states]).half() for k in states[0]}
    save_file(merged, str(out))


def baseline_case(folder: Path, label: str, repeats: int) -> dict:
    target = folder / f"{label}.baseline.safetensors"
    seconds = [timed(lambda: baseline(folder, CASES[label][0], target)) for _ in range(repeats)]
    target.unlink()
    return median_of(seconds)


KINDS = {"live": live_case, "export": export_case, "baseline": baseline_case}


def child(kind: str, label: str, folder: Path, repeats: int) -> dict:
    """One measurement in a fresh process, so that its peak anonymous RSS (above the level after
    the imports, over the whole run) is its own and not memory an earlier one left in the heap."""
    with PeakAnon() as peak:
        result = KINDS[kind](folder, label, repeats)
    return {**result, "peak_anon_mib": round(peak.peak, 1)}


def run_child(kind: str, label: str, folder: Path, repeats: int, need_mib: float) -> dict | str:
    skipped = fits(need_mib)
    if skipped:
        return skipped
    command = [sys.executable, "-m", "bench.merge_speed", "--child", kind, "--case", label]
    command += ["--keep", str(folder), "--repeats", str(repeats)]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return f"failed: {done.stderr.strip().splitlines()[-1:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_case(folder: Path, label: str, model_mib: float, repeats: int) -> dict:
    """One case live, exported and by the baseline loop, with the ratios export / baseline.
    Memory estimates for the skip test (``model_mib``: one model's merged weights in fp16): live
    holds every source and the scratch modules (fp32 on the CPU, twice the fp16 files); the
    baseline every input and the merged state dict."""
    fp32 = 1 if torch.cuda.is_available() else 2
    n_inputs = 3 if CASES[label][1] else 2
    row = {
        "recipe": export_recipe(Path("."), label),
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    row["live"] = run_child("live", label, folder, repeats, (n_inputs + 1) * fp32 * model_mib)
    row["export"] = run_child("export", label, folder, repeats, model_mib)
    row["baseline"] = run_child("baseline", label, folder, repeats, (n_inputs + 1) * model_mib)
    if isinstance(row["export"], dict) and isinstance(row["baseline"], dict):
        row["export_over_baseline"] = {
            key: round(row["export"][key] / row["baseline"][key], 3)
            if row["baseline"][key]
            else None
            for key in ("s", "peak_anon_mib")
        }
    row["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.merge_speed")
    parser.add_argument("--arch", choices=["toy", "sd15", "sdxl"], default="sd15")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="make the models here (and keep them)")
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=sorted(CASES),
        default=sorted(CASES),
        help="measure these again; the other cases of an earlier results file are kept",
    )
    parser.add_argument("--child", choices=sorted(KINDS), help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    registry.quiet_libraries()
    if args.child:
        print(json.dumps(child(args.child, args.case, args.keep, args.repeats)))
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix="merge-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    start = time.time()
    if not (folder / "b" / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        make_models(args.arch, folder)
    unet_file = folder / "a" / "unet" / "diffusion_pytorch_model.safetensors"
    unet_mib = unet_file.stat().st_size / 2**20
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config(args.arch))
    text_params = sum(
        p.numel() for c in TEXT_ENCODERS[args.arch] for p in text_encoder(args.arch, c).parameters()
    )
    result = {
        "benchmark": "merge speed and memory (issue 5)",
        "device": device_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "arch": args.arch,
        "unet_params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
        "unet_fp16_mib": round(unet_mib, 1),
        "text_encoders_params_m": round(text_params / 1e6, 1),
        "merged_fp16_mib": round(model_mib(folder), 1),
        "not_in_inputs": "the VAE is the toy zoo's (a few MB), copied, not merged"
        + ("; so is the text encoder, the same in all three models" if args.arch == "toy" else ""),
        "repeats": args.repeats,
        "mem_total_mib": round(_meminfo("MemTotal"), 0),
        "mem_available_mib_at_start": round(available_mib(), 0),
        "loadavg_before": [round(x, 2) for x in load_before],
    }
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    path = RESULTS / f"merge-speed-{args.arch}-{kind}.json"
    earlier = json.loads(path.read_text())["cases"] if path.is_file() else {}
    cases = {k: v for k, v in earlier.items() if k in CASES and k not in args.cases}
    for label in args.cases:
        cases[label] = measure_case(folder, label, model_mib(folder), args.repeats)
    result["cases"] = {k: cases[k] for k in CASES if k in cases}
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["minutes"] = round((time.time() - start) / 60, 1)
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
