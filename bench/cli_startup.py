"""How long ``python -m composer models`` and ``python -m composer info IMAGE`` take to answer
(issue 21: under 2 s), each in a fresh process, as a user runs them.

    python -m bench.cli_startup [--repeats 5]

A PNG with a recipe is written first (``composer.sharing.pnginfo``, no sampling). Also times
``python -c "import torch"`` for scale: a command that imports torch cannot answer faster.
Writes ``bench/results/cli-startup-cpu.json`` (median, min and max seconds per command).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import RESULTS

TARGET_SECONDS = 2.0


def seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from PIL import Image

    from composer.recipe import parse
    from composer.sharing.pnginfo import png_bytes, png_info

    recipe = parse({"prompt": "a red circle", "experts": [{"model": "toy-warm"}]})
    image = Path(tempfile.mkdtemp()) / "00000.png"
    image.write_bytes(png_bytes(Image.new("RGB", (32, 32)), png_info(recipe)))
    commands = {
        "models": [sys.executable, "-m", "composer", "models"],
        "info": [sys.executable, "-m", "composer", "info", str(image)],
        "import torch (for scale)": [sys.executable, "-c", "import torch"],
    }
    for command in commands.values():  # warm the page cache once, as a second run would
        seconds(command)
    results = {}
    for name, command in commands.items():
        times = [seconds(command) for _ in range(args.repeats)]
        results[name] = {
            "median_s": round(statistics.median(times), 3),
            "min_s": round(min(times), 3),
            "max_s": round(max(times), 3),
        }
        print(f"{name}: {results[name]}", flush=True)
    out = {
        "what": "seconds from process start to exit, fresh process, page cache warm",
        "target_s": TARGET_SECONDS,
        "repeats": args.repeats,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "commands": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "cli-startup-cpu.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(path)


if __name__ == "__main__":
    main()
