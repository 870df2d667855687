"""PNG text chunks: our recipe (``composer_recipe``) and AUTOMATIC1111's ``parameters``.

``parameters`` follows what A1111 writes and what its "PNG Info", Civitai and other tools read
(../shared/FIELD_NOTES.md, "Image metadata"): the prompt (with ``<lora:name:weight>`` tags, as
A1111 writes LoRAs into the prompt), ``Negative prompt: …`` when not empty, and a last line of
``Key: value`` pairs where a value holding ``,`` ``:`` or a newline is JSON-quoted.
"""

from __future__ import annotations

import json
import re
from io import BytesIO
from pathlib import Path

from PIL import Image, PngImagePlugin

from composer.recipe import Recipe, RecipeError, a1111_sampler_name, parse

RECIPE_CHUNK = "composer_recipe"
PARAMETERS_CHUNK = "parameters"
VERSION = "diffusion-composer 0.1"
_LORA_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def model_name(reference: str) -> str:
    """What A1111 shows as ``Model``: the file or folder name without its extension."""
    name = Path(reference.rstrip("/")).name
    return name.removesuffix(".safetensors") or reference


def lora_name(reference: str) -> str:
    path = Path(reference.rstrip("/"))
    stem = path.parent.name if path.name == "pytorch_lora_weights.safetensors" else path.name
    return _LORA_NAME.sub("_", stem.removesuffix(".safetensors")) or "lora"


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


def a1111_parameters(
    recipe: Recipe,
    index: int = 0,
    model_hashes: dict[str, str] | None = None,
    lora_hashes: dict[str, str] | None = None,
    sampler: str | None = None,
    batch: tuple[int, int] | None = None,
) -> str:
    """The ``parameters`` text of image ``index`` of ``recipe`` (its seed is ``seed + index``).

    ``model_hashes`` maps a model reference to its sha256, ``lora_hashes`` a LoRA reference to the
    sha256 of its safetensors body; A1111 shows the first 10 and 12 hex digits of them.
    ``sampler`` names a method's own sampler (``Method.sampler``) where it does not use the
    recipe's scheduler. ``batch`` is (first index, size) of the batch the image was made in;
    a batch of more than one is written as A1111 writes it, ``Batch size`` and ``Batch pos``.
    """
    model_hashes, lora_hashes = model_hashes or {}, lora_hashes or {}
    loras = {lo.path: lo.weight for e in recipe.experts for lo in e.loras}
    tags = "".join(f" <lora:{lora_name(p)}:{w:g}>" for p, w in loras.items())
    lines = [recipe.prompt + tags]
    if recipe.negative_prompt:
        lines.append(f"Negative prompt: {recipe.negative_prompt}")
    s = recipe.sampler
    pairs = [
        ("Steps", str(s.steps)),
        (
            "Sampler",
            sampler or a1111_sampler_name(s.scheduler),
        ),
        ("CFG scale", f"{s.guidance_scale:g}"),
        ("Seed", str(s.seed + index)),
    ]
    if s.width and s.height:
        pairs.append(("Size", f"{s.width}x{s.height}"))
    if batch is not None and batch[1] > 1:
        pairs += [("Batch size", str(batch[1])), ("Batch pos", str(index - batch[0]))]
    models = list(dict.fromkeys(e.model for e in recipe.experts))
    first_hash = model_hashes.get(models[0])
    if len(models) == 1 and first_hash:
        pairs.append(("Model hash", first_hash[:10]))
    pairs.append(("Model", ", ".join(model_name(m) for m in models)))
    if loras:
        hashed = [f"{lora_name(p)}: {lora_hashes[p][:12]}" for p in loras if p in lora_hashes]
        if hashed:
            pairs.append(("Lora hashes", ", ".join(hashed)))
    if recipe.method != "single":
        pairs.append(("Composition", recipe.method))
    pairs.append(("Version", VERSION))
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in pairs))
    return "\n".join(lines)


def image_recipe(recipe: Recipe, index: int, batch: tuple[int, int] | None = None) -> Recipe:
    """The recipe that makes exactly image ``index`` of ``recipe`` again: the image alone (seed
    ``seed + index``) when it was made alone, else the batch (first index, size) it was made in,
    since a batch changes an image by float rounding (``composer.methods.batches``)."""
    from dataclasses import replace

    start, size = batch or (index, 1)
    s = recipe.sampler
    if size == 1:
        sampler = replace(s, seed=s.seed + index, num_images=1, batch_size=None)
    else:
        sampler = replace(s, seed=s.seed + start, num_images=size, batch_size=size)
    return replace(recipe, sampler=sampler)


def png_info(
    recipe: Recipe,
    index: int = 0,
    model_hashes: dict | None = None,
    lora_hashes: dict | None = None,
    sampler: str | None = None,
    batch: tuple[int, int] | None = None,
) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    text = a1111_parameters(recipe, index, model_hashes, lora_hashes, sampler, batch)
    info.add_text(PARAMETERS_CHUNK, text)
    info.add_itxt(RECIPE_CHUNK, image_recipe(recipe, index, batch).to_json(indent=None))
    return info


def png_bytes(image: Image.Image, info: PngImagePlugin.PngInfo) -> bytes:
    buf = BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_recipe(image: Image.Image | str | Path) -> Recipe:
    """The recipe a PNG carries; ``RecipeError`` when it carries none or a broken one."""
    if not isinstance(image, Image.Image):
        try:
            with Image.open(image) as opened:
                opened.load()
                text = dict(opened.info).get(RECIPE_CHUNK)
        except (OSError, ValueError) as e:
            raise RecipeError(f"image: {str(image)!r} is not a readable image ({e})") from None
    else:
        text = image.info.get(RECIPE_CHUNK)
    if text is None:
        raise RecipeError(
            f"image: it carries no {RECIPE_CHUNK!r} text chunk; only images made "
            "by Diffusion Composer do"
        )
    return parse(text)
