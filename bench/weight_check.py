"""What validating weights on load costs (issues 19 and 20), as a fraction of loading.

    python -m bench.weight_check [--arch sd15|toy] [--repeats 3] [--keep DIR]

Makes a random fp16 model of the architecture's real shapes (``bench.merge_speed.make_models``:
SD 1.5's U-Net and CLIP ViT-L, the toy zoo's VAE) as a diffusers folder and as one single file,
then loads each with ``registry.load_pipeline`` (fp32 on the CPU, the dtype a GPU would use there)
``--repeats`` times from a warm page cache, reporting medians of:

- ``load_s``: ``load_pipeline``, the finiteness check included (the header is checked when the
  reference resolves, before);
- ``header_s``: every ``.safetensors`` header read and checked (``validate.check_header``);
- ``shapes_s``: the single file's U-Net against its architecture (``single_file.check_shapes``),
  which runs only when a load has failed, to name the tensor (not in ``check_fraction``);
- ``finite_s``: every loaded tensor checked finite (``validate.check_pipeline``: one fused norm
  over all tensors where they lie);
- ``full_scan_s``: for comparison, ``torch.isfinite(t).all()`` over every loaded tensor, the
  element-wise scan the fused norm avoids.

``check_fraction`` = (header + finite) / load. Results in
``bench/results/weight-check-<arch>-<device>.json``, with the device named and the load average
(other jobs share the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import RESULTS
from bench.merge_speed import make_models
from composer import registry
from composer.checkpoints import single_file, validate
from composer.checkpoints.ldm_format import save_single_file
from composer.device import device_name


def median_time(fn, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return round(statistics.median(seconds), 4)


def measure(location: str, repeats: int) -> dict:
    source = registry.resolve_model(location)
    device = torch.device("cpu")
    registry.load_pipeline(source, device, torch.float32)  # warms the page cache
    load_s = median_time(lambda: registry.load_pipeline(source, device, torch.float32), repeats)
    pipe = registry.load_pipeline(source, device, torch.float32)
    files = validate.weight_files(source.location)
    header_s = median_time(lambda: [validate.check_header(f) for f in files], repeats)
    shapes_s = 0.0
    if source.kind == "single_file":
        config = registry.single_file_config(source)
        shapes_s = median_time(lambda: single_file.check_shapes(source.location, config), repeats)
    finite_s = median_time(lambda: validate.check_pipeline(pipe, files), repeats)

    def full_scan():
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                for t in module.state_dict().values():
                    if t.is_floating_point():
                        bool(torch.isfinite(t).all())

    full_scan_s = median_time(full_scan, repeats)
    params = sum(
        t.numel()
        for m in pipe.components.values()
        if isinstance(m, torch.nn.Module)
        for t in m.state_dict().values()
    )
    checks = header_s + finite_s
    return {
        "kind": source.kind,
        "file_mib": round(sum(f.stat().st_size for f in files) / 2**20, 1),
        "tensor_elements": params,
        "load_s": load_s,
        "header_s": header_s,
        "shapes_s": shapes_s,
        "finite_s": finite_s,
        "full_scan_s": full_scan_s,
        "check_fraction": round(checks / load_s, 4),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("sd15", "toy"), default="sd15")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", help="make (or reuse) the models in this folder")
    args = parser.parse_args(argv)
    folder = Path(args.keep or tempfile.mkdtemp(prefix="weight-check-"))
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "base"
    if not (model / "model_index.json").is_file():
        make_models(args.arch, folder)
    single = folder / "base.safetensors"
    if not single.is_file():
        pipe = registry.load_pipeline(
            registry.resolve_model(str(model)), torch.device("cpu"), torch.float16
        )
        save_single_file(pipe, single, str(model))
        del pipe
    results = {
        "benchmark": "weight_check",
        "device": device_name(),
        "torch": torch.__version__,
        "arch": args.arch,
        "dtype_in_file": "fp16",
        "dtype_loaded": "fp32",
        "repeats": args.repeats,
        "load_average_before": round(os.getloadavg()[0], 2),
        "folder": measure(str(model), args.repeats),
        "single_file": measure(str(single), args.repeats),
        "load_average_after": round(os.getloadavg()[0], 2),
    }
    name = device_name().split(" (")[0].replace(" ", "-").lower()
    out = RESULTS / f"weight-check-{args.arch}-{name.split('-')[0]}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
