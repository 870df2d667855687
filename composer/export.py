"""Recipe → one single-file ``.safetensors`` checkpoint, streamed tensor by tensor.

    python -m composer merge RECIPE.json --out merged.safetensors [--dtype fp16|bf16|fp32]
    python -m composer lora bake MODEL LORA[:strength] ... --out baked.safetensors

The recipe's models are resolved through the registry and opened memory-mapped
(``checkpoints.files``); ``merge.stream`` computes each merged parameter in fp32 (on the GPU when
there is one) as it is asked for, with each expert's LoRAs baked in, and
``checkpoints.writer.StreamingWriter`` writes it in the asked dtype, in the original Stable
Diffusion layout (``checkpoints.ldm_format``: SD 1.x or SDXL), so peak RAM is a few tensors, not
a model. U-Net and text encoder(s) are merged as the live merge merges them; the VAE is the first
expert's. ``__metadata__`` holds the recipe, the sha256 of each input (U-Net weights, LoRA files)
and the config folder that lets the registry load the file back offline.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from composer import registry
from composer.checkpoints import ldm_format
from composer.checkpoints.files import CheckpointError, ModelFiles, single_file_layout
from composer.checkpoints.hashing import file_sha256
from composer.checkpoints.writer import StreamingWriter
from composer.merge.registry import Merge, MergeError, check
from composer.merge.stream import StreamedMerge
from composer.recipe import Recipe, RecipeError, looks_like_hub_id

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
RECIPE_KEY = "composer_recipe"
INPUTS_KEY = "composer_inputs"


def export(recipe: Recipe, out: str | Path, dtype: str = "fp16", device: str | None = None) -> dict:
    """Stream ``recipe`` into ``out``: the merge of its experts (a method whose settings are a
    ``Merge``), or its one expert (what ``composer lora bake`` writes). Each expert's LoRAs are
    baked into that expert's weights (U-Net and text encoders) as each tensor is read. Returns
    what was done. ``composer.engine.export`` asks the recipe's method whether it exports."""
    settings = recipe.settings if isinstance(recipe.settings, Merge) else None
    if settings is None and len(recipe.experts) != 1:
        raise RecipeError(
            f"method: {recipe.method!r} is not accepted; export needs 'merge', or 'single' to bake "
            "an expert's LoRAs into its model"
        )
    if settings is not None and settings.method == "fisher":
        raise RecipeError(
            "merge.method: 'fisher' is not exported yet (its Fisher estimates need the models "
            "loaded to sample from); generate with it, or export another method"
        )
    target = DTYPES[dtype]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    try:
        if settings is not None:
            check(settings, len(recipe.experts), settings.base is not None)
        with ExitStack() as stack:
            experts = [
                open_model(e.model, f"experts[{i}].model", stack)
                for i, e in enumerate(recipe.experts)
            ]
            base = (
                open_model(settings.base, "merge.base", stack)
                if settings and settings.base
                else None
            )
            loras = [_lora_files(e, i) for i, e in enumerate(recipe.experts)]
            merge = StreamedMerge(
                settings, experts, base, [e.weight for e in recipe.experts], loras, dev
            )
            first = experts[0]
            layout = single_file_layout(first)
            entries = [
                (name, target, ldm_format.assembled_shape(op, [first.shape(s) for s in sources]))
                for name, sources, op in layout
            ]
            entries += [(p.name, _out_dtype(p.dtype(), target), p.shape()) for p in first.parts]
            inputs = {
                m.reference: file_sha256(m.unet_file) for m in [*experts, *([base] if base else [])]
            }
            inputs.update(
                {
                    lo.path: file_sha256(path)
                    for e, files in zip(recipe.experts, loras, strict=True)
                    for lo, (_, path, _) in zip(e.loras, files, strict=True)
                }
            )
            meta = {
                ldm_format.CONFIG_KEY: first.config_folder,
                RECIPE_KEY: recipe.to_json(),
                INPUTS_KEY: json.dumps(inputs),
            }
            writer = StreamingWriter(out, entries, meta)
            try:
                with torch.no_grad():
                    for name, sources, op in layout:
                        value = ldm_format.assemble(op, [merge.merged(s) for s in sources])
                        writer.write(name, value.to(target))
                    for part in first.parts:
                        writer.write(part.name, part.read().to(_out_dtype(part.dtype(), target)))
                writer.close()
            except BaseException:
                writer.abort()
                raise
    except (MergeError, CheckpointError) as e:
        raise RecipeError(str(e)) from None
    return {
        "path": str(out),
        "tensors": len(entries),
        "bytes": Path(out).stat().st_size,
        "dtype": dtype,
        "device": str(dev),
        "seconds": round(time.perf_counter() - start, 3),
    }


def open_model(reference: str, where: str, stack: ExitStack) -> ModelFiles:
    """The local files of model ``reference`` (recipe field ``where``), open until ``stack``
    closes. A Hub id, or a single file that is not ``.safetensors`` or names no config folder, is
    a ``RecipeError``."""
    source = registry.resolve_model(reference, where)
    if source.kind == "hub":
        raise RecipeError(
            f"{where}: {source.reference!r} is a Hub id; export needs local files (download "
            "it, or merge live on the page)"
        )
    if source.kind == "single_file":
        if not source.location.endswith(".safetensors"):
            raise RecipeError(f"{where}: export reads .safetensors files only")
        config_folder = registry.single_file_config(source)
        if config_folder is None:
            raise RecipeError(
                f"{where}: {source.reference!r} names no config folder; set "
                "COMPOSER_SINGLE_FILE_CONFIG to a diffusers folder of its architecture"
            )
    else:
        config_folder = source.reference if source.kind == "bundled" else source.location
    try:
        return ModelFiles(source.reference, source.location, config_folder, where, stack)
    except CheckpointError as e:
        raise RecipeError(str(e)) from None


def _lora_files(expert, i: int) -> list[tuple[str, str, float]]:
    """An expert's LoRAs as ``lora.bake_plan`` takes them: (recipe field, local file, strength)."""
    files = []
    for j, lo in enumerate(expert.loras):
        where = f"experts[{i}].loras[{j}].path"
        path = registry.resolve_lora(lo.path, where)
        if looks_like_hub_id(path):
            raise RecipeError(
                f"{where}: {lo.path!r} is a Hub id; export needs local files (download it, or "
                "merge live on the page)"
            )
        files.append((where, path, lo.weight))
    return files


def _out_dtype(source: torch.dtype, target: torch.dtype) -> torch.dtype:
    """Floating-point tensors in the asked dtype; others (position ids) as they are."""
    return target if source.is_floating_point else source
