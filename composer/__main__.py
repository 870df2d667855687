"""The command line: ``python -m composer generate | grid | merge | lora | aggregate | info |
models`` (../shared/RECIPE.md).

Every user mistake ends as one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from composer.recipe import RecipeError

LIGHT_COMMANDS = ("info", "models")
"""Commands that answer without torch, diffusers or transformers (under 2 s:
``bench/cli_startup.py``); every import of those is inside the commands that use them."""


def _generate(args: argparse.Namespace) -> int:
    from composer import engine

    recipe = _load_recipe(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\rstep {done}/{total}", end="" if done < total else "\n", file=sys.stderr)

    result = engine.generate(recipe, progress=progress)
    for i, (image, info) in enumerate(zip(result.images, result.metadata, strict=False)):
        path = out / f"{i:05d}.png"
        image.save(path, format="PNG", pnginfo=info)
        print(
            json.dumps(
                {"path": str(path), "seed": result.seeds[i], "seconds": round(result.seconds[i], 3)}
            ),
            flush=True,
        )
    return 0


def _load_recipe(args: argparse.Namespace):
    from composer import registry
    from composer.recipe import parse
    from composer.untrusted import load_json

    text = sys.stdin.read() if args.recipe == "-" else _read(args.recipe)
    data = load_json(text, "recipe", source=args.recipe)
    if not isinstance(data, dict):
        raise RecipeError(f"recipe: {args.recipe} must hold a JSON object")
    return parse(apply_overrides(data, args.set), check=registry.check_reference)


def apply_overrides(data: dict, assignments: list[str]) -> dict:
    """Apply ``key.path=value`` assignments (the CLI's ``--set``) to a recipe dict, in place.

    The value is read as JSON when it parses (``3``, ``null``, ``[0, 1.1]``), else as a string.
    A list index is a number in the path: ``experts.0.model=toy-cool``.
    """
    for assignment in assignments:
        path, sep, raw = assignment.partition("=")
        if not sep or not path:
            raise RecipeError(f"--set {assignment!r}: expected key.path=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node: Any = data
        keys = path.split(".")
        for k in keys[:-1]:
            node = _step_into(node, k, path)
        last = keys[-1]
        if isinstance(node, list):
            node[_index(node, last, path)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError(f"--set {path}: {last!r} is inside a value, not an object")
    return data


def _step_into(node: Any, key: str, path: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, key, path)]
    if not isinstance(node, dict):
        raise RecipeError(f"--set {path}: {key!r} is inside a value, not an object")
    return node.setdefault(key, {})


def _index(node: list, key: str, path: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise RecipeError(f"--set {path}: {key!r} is not an index of a list of {len(node)}")
    return int(key)


def _grid(args: argparse.Namespace) -> int:
    from composer import grid
    from composer.untrusted import load_json

    text = sys.stdin.read() if args.recipe == "-" else _read(args.recipe)
    data = load_json(text, "recipe", source=args.recipe)
    if not isinstance(data, dict):
        raise RecipeError(f"recipe: {args.recipe} must hold a JSON object")
    data = apply_overrides(data, args.set)
    y = grid.parse_axis(args.y) if args.y else None
    made = grid.run(data, grid.parse_axis(args.x), y)
    for line in grid.write(made, Path(args.out)):
        print(json.dumps(line), flush=True)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from composer.engine import export

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise RecipeError(f"--out: {args.out!r} is not accepted; expected a .safetensors path")
    print(json.dumps(export(_load_recipe(args), out, args.dtype)), flush=True)
    return 0


def _lora(args: argparse.Namespace) -> int:
    import time
    from contextlib import ExitStack

    from composer import registry
    from composer.checkpoints.lora_files import write_lora
    from composer.merge import lora

    start = time.perf_counter()
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise RecipeError(f"--out: {args.out!r} is not accepted; expected a .safetensors path")
    if args.action == "bake":
        return _bake(args, out)
    if args.action == "merge":
        paths = [registry.resolve_lora(p, "lora") for p in args.inputs]
        strengths = args.strength or [1.0] * len(paths)
        if len(strengths) != len(paths):
            raise RecipeError(f"--strength: {len(strengths)} values for {len(paths)} LoRAs")
        try:
            pairs = lora.merge_files(
                paths, strengths, args.method, args.rank, args.density, args.seed
            )
        except ValueError as e:
            raise RecipeError(f"lora merge: {e}") from None
        meta = {
            "composer_lora_merge": json.dumps(
                {
                    "inputs": args.inputs,
                    "strengths": strengths,
                    "method": args.method,
                    "rank": args.rank,
                    "density": args.density,
                    "seed": args.seed,
                }
            )
        }
    else:
        from composer.export import open_model

        if len(args.inputs) != 2:
            raise RecipeError("lora extract: give two models, BASE then TUNED")
        with ExitStack() as stack:
            base, tuned = (open_model(ref, "model", stack) for ref in args.inputs)
            pairs = lora.extract_models(tuned, base, args.rank or 8)
        meta = {
            "composer_lora_extract": json.dumps(
                {"base": args.inputs[0], "tuned": args.inputs[1], "rank": args.rank or 8}
            )
        }
    write_lora(str(out), pairs, meta)
    print(
        json.dumps(
            {
                "path": str(out),
                "modules": len(pairs),
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
    )
    return 0


def _bake(args: argparse.Namespace, out: Path) -> int:
    """``lora bake MODEL LORA[:strength] ...``: the model with its LoRAs baked in, as one
    single-file checkpoint, by exporting the ``single`` recipe of that model and those LoRAs."""
    from composer import registry
    from composer.engine import export
    from composer.recipe import parse

    if len(args.inputs) < 2:
        raise RecipeError("lora bake: give a model, then one or more LORA or LORA:strength")
    model, *loras = args.inputs
    recipe = parse(
        {"prompt": "", "experts": [{"model": model, "loras": [_lora_strength(a) for a in loras]}]},
        check=registry.check_reference,
    )
    print(json.dumps(export(recipe, out, args.dtype)), flush=True)
    return 0


def _lora_strength(arg: str) -> dict:
    """``toy-purple:0.8`` → path and strength; without a numeric ``:strength`` the strength is 1."""
    path, _, strength = arg.rpartition(":")
    try:
        return {"path": path, "weight": float(strength)} if path else {"path": arg}
    except ValueError:
        return {"path": arg}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe: cannot read {path!r} ({e.__class__.__name__}: {e})") from None


def _info(args: argparse.Namespace) -> int:
    from composer.sharing.pnginfo import not_carried, read_recipe

    print(read_recipe(args.image).to_json())
    left_out = not_carried(args.image)
    if left_out:
        print(f"note: not carried over from its parameters: {', '.join(left_out)}", file=sys.stderr)
    return 0


KINDS = ("models", "loras", "aggregators", "routers")
"""What ``composer models`` lists: every kind of thing the bundled zoo holds."""


def _models(args: argparse.Namespace) -> int:
    from composer import zoo as registry  # the folders only: no torch for a listing

    listing = {kind: sorted(registry.bundled(kind)) for kind in KINDS}
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    for kind, names in listing.items():
        print(f"{kind}:")
        for name in names:
            card = registry.bundled(kind)[name] / "README.md"
            summary = _summary(card) if card.is_file() else ""
            print(f"  {name:<14} {summary}".rstrip())
        if not names:
            print("  (none)")
    return 0


def _summary(card: Path) -> str:
    """The first plain sentence of a model card (front matter and headings skipped)."""
    lines = card.read_text().splitlines()
    if lines and lines[0].strip() == "---":
        end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), 0)
        lines = lines[end + 1 :]
    return next((line.strip() for line in lines if line.strip() and not line.startswith("#")), "")


def main(argv: list[str] | None = None) -> int:
    from composer.merge.registry import LORA_MERGE_METHODS

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["aggregate"], ["router"]):  # library advice would bury the trainers' own
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if argv[:1] == ["aggregate"]:  # its own options: python -m composer aggregate train --help
        from composer.training import cli as aggregate

        return aggregate.main(argv[1:])
    if argv[:1] == ["router"]:  # python -m composer router train --help
        from composer.training import router

        return router.main(argv[1:])
    if argv[:1] == ["serve"]:  # python -m composer serve --help (needs ray[serve])
        from composer.serve import cli as serve

        return serve.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m composer", description="Combine diffusion models from a recipe."
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow loading pickle weights (.ckpt/.bin/.pt), which can run code",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="run a recipe and write PNGs")
    gen.add_argument("recipe", help="recipe JSON file, or - for stdin")
    gen.add_argument("--out", required=True, help="folder for 00000.png, 00001.png, ...")
    gen.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set sampler.seed=3 (repeatable)",
    )
    gen.set_defaults(run=_generate)
    grid = sub.add_parser(
        "grid", help="one labelled picture of a recipe over one or two fields' values (X/Y plot)"
    )
    grid.add_argument("recipe", help="recipe JSON file, or - for stdin")
    grid.add_argument(
        "--x", required=True, metavar="KEY=V1,V2,...", help="e.g. merge.density=0.2,0.5"
    )
    grid.add_argument("--y", metavar="KEY=V1,V2,...", help="e.g. sampler.seed=1,2,3")
    grid.add_argument("--out", default="grid", help="folder for grid.png and cell-R-C.png")
    grid.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    grid.set_defaults(run=_grid)
    merge = sub.add_parser(
        "merge", help="export a merge recipe to one .safetensors checkpoint, tensor by tensor"
    )
    merge.add_argument("recipe", help="recipe JSON file (method merge), or - for stdin")
    merge.add_argument("--out", required=True, help="the .safetensors file to write")
    merge.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    merge.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    merge.set_defaults(run=_merge)
    lora = sub.add_parser(
        "lora",
        help="merge LoRA files (exact or TIES/DARE on ΔW), extract one from 2 models, or bake "
        "LoRAs into a model",
    )
    lora.add_argument("action", choices=["merge", "extract", "bake"])
    lora.add_argument(
        "inputs",
        nargs="+",
        help="merge: LoRAs; extract: BASE_MODEL TUNED_MODEL; bake: MODEL LORA[:strength] ...",
    )
    lora.add_argument("--out", required=True)
    lora.add_argument("--strength", type=float, nargs="+", help="merge: one per LoRA (1.0)")
    lora.add_argument("--method", choices=LORA_MERGE_METHODS, default="concat")
    lora.add_argument("--rank", type=int, default=None, help="SVD to this rank (extract: 8)")
    lora.add_argument("--density", type=float, default=0.2)
    lora.add_argument("--seed", type=int, default=0)
    lora.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="bake")
    lora.set_defaults(run=_lora)
    info = sub.add_parser("info", help="print the recipe stored in a PNG")
    info.add_argument("image")
    info.set_defaults(run=_info)
    sub.add_parser(
        "aggregate", help="train an AFA aggregator: aggregate train --experts … (--help there)"
    )
    sub.add_parser("serve", help="serve the page to many users with Ray Serve (serve --help)")
    models = sub.add_parser("models", help="list the bundled models, LoRAs and aggregators")
    models.add_argument("--json", action="store_true")
    models.set_defaults(run=_models)
    args = parser.parse_args(argv)
    if args.command not in LIGHT_COMMANDS:
        from composer.registry import quiet_libraries

        quiet_libraries()
    if args.allow_pickle:
        os.environ["COMPOSER_ALLOW_PICKLE"] = "1"
    try:
        return args.run(args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
