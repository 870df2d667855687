"""Train the bundled superposition router ``toy-warm-cool`` for ``toy-warm`` + ``toy-cool``.

    python -m toyworld.train_router [--out assets/routers/toy-warm-cool] [--steps 1500]

Renders each expert's own domain (``toyworld.zoo.DOMAINS``: red and yellow shapes for toy-warm,
green and blue ones for toy-cool) into one folder per expert and trains the router with
``composer.training.router`` on them, as a user would with their own pictures.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from toyworld.render import render
from toyworld.zoo import DOMAINS

EXPERTS = {"toy-warm": "warm", "toy-cool": "cool"}


def render_folders(root: Path, per_expert: int, seed: int = 0) -> list[Path]:
    folders = []
    for name, domain in EXPERTS.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        colors, shapes = DOMAINS[domain].colors, DOMAINS[domain].shapes
        for i in range(per_expert):
            color, shape = colors[i % len(colors)], shapes[(i // len(colors)) % len(shapes)]
            render(shape, color, seed + i).save(folder / f"{i:05d}.png")
        folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> None:
    from composer import registry
    from composer.training.router import train

    parser = argparse.ArgumentParser(prog="python -m toyworld.train_router")
    parser.add_argument("--out", type=Path, default=Path("assets/routers/toy-warm-cool"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--images", type=int, default=512, help="per expert")
    args = parser.parse_args(argv)
    registry.quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        folders = render_folders(Path(tmp), args.images)
        with registry.CACHE.lease(registry.resolve_model("toy-warm")) as lease:
            figures = train(lease.pipe, list(EXPERTS), folders, args.out, steps=args.steps)
    print(figures)


if __name__ == "__main__":
    main()
