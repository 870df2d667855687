"""PNG text chunks: our recipe (``composer_recipe``) and AUTOMATIC1111's ``parameters``.

``parameters`` follows what A1111 writes and what its "PNG Info", Civitai and other tools read
(../shared/FIELD_NOTES.md, "Image metadata"): the prompt (with ``<lora:name:weight>`` tags, as
A1111 writes LoRAs into the prompt), ``Negative prompt: …`` when not empty, and a last line of
``Key: value`` pairs where a value holding ``,`` ``:`` or a newline is JSON-quoted, among them
``Size``, ``Model hash`` (AutoV2), ``Lora hashes`` and ``TI hashes`` so that a model-sharing site
links an uploaded image to the files it used. ``read_recipe`` reads our recipe back, or, from an
image of another tool, a best-effort recipe from its ``parameters`` (``from_a1111``).
"""

from __future__ import annotations

import json
import re
from io import BytesIO
from pathlib import Path

from PIL import Image, PngImagePlugin

from composer import prompts
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
    ti_hashes: dict[str, str] | None = None,
    size: tuple[int, int] | None = None,
) -> str:
    """The ``parameters`` text of image ``index`` of ``recipe`` (its seed is ``seed + index``).

    ``model_hashes`` maps a model reference to its sha256, ``lora_hashes`` a LoRA reference to the
    sha256 of its safetensors body, ``ti_hashes`` an embedding's token to its file's sha256; A1111
    shows the first 10 (``Model hash``, "AutoV2") and 12 (``Lora hashes``, ``TI hashes``) hex
    digits of them. ``size`` is the image's (width, height), written as ``Size`` (else the
    recipe's, when it gives one). The prompt is the recipe's as written, its ``<lora:…>`` tags
    included, plus a tag for every other LoRA of the experts. ``sampler`` names a method's own
    sampler (``Method.sampler``) where it does not use the recipe's scheduler. ``batch`` is
    (first index, size) of the batch the image was made in; a batch of more than one is written
    as A1111 writes it, ``Batch size`` and ``Batch pos``.
    """
    model_hashes, lora_hashes, ti_hashes = model_hashes or {}, lora_hashes or {}, ti_hashes or {}
    loras: dict[str, float] = {}
    for i in range(len(recipe.experts)):
        for lo in recipe.expert_loras(i):
            loras.setdefault(lo.path, lo.weight)
    written = {t.name for t in prompts.tags(recipe.prompt, "prompt")}
    names = {p: p if p in written else lora_name(p) for p in loras}
    extra = "".join(" " + prompts.tag(names[p], w) for p, w in loras.items() if p not in written)
    lines = [recipe.prompt + extra]
    if recipe.negative_prompt:
        lines.append(f"Negative prompt: {recipe.negative_prompt}")
    s = recipe.sampler
    pairs = [
        ("Steps", str(s.steps)),
        ("Sampler", sampler or a1111_sampler_name(s.scheduler)),
        ("CFG scale", f"{s.guidance_scale:g}"),
        ("Seed", str(s.seed + index)),
    ]
    width, height = size or (s.width, s.height)
    if width and height:
        pairs.append(("Size", f"{width}x{height}"))
    if batch is not None and batch[1] > 1:
        pairs += [("Batch size", str(batch[1])), ("Batch pos", str(index - batch[0]))]
    models = list(dict.fromkeys(e.model for e in recipe.experts))
    first_hash = model_hashes.get(models[0])
    if len(models) == 1 and first_hash:
        pairs.append(("Model hash", first_hash[:10]))
    pairs.append(("Model", ", ".join(model_name(m) for m in models)))
    hashed = [f"{_alias(names[p])}: {lora_hashes[p][:12]}" for p in loras if p in lora_hashes]
    if hashed:
        pairs.append(("Lora hashes", ", ".join(hashed)))
    if ti_hashes:
        pairs.append(("TI hashes", ", ".join(f"{t}: {h[:12]}" for t, h in ti_hashes.items())))
    if recipe.method != "single":
        pairs.append(("Composition", recipe.method))
    pairs.append(("Version", VERSION))
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in pairs))
    return "\n".join(lines)


def _alias(name: str) -> str:
    """A LoRA's name in ``Lora hashes``, as A1111 writes it: without ``:`` and ``,``."""
    return name.replace(":", "").replace(",", "")


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
    ti_hashes: dict | None = None,
    size: tuple[int, int] | None = None,
) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    text = a1111_parameters(
        recipe, index, model_hashes, lora_hashes, sampler, batch, ti_hashes, size
    )
    info.add_text(PARAMETERS_CHUNK, text)
    info.add_itxt(RECIPE_CHUNK, image_recipe(recipe, index, batch).to_json(indent=None))
    return info


def png_bytes(image: Image.Image, info: PngImagePlugin.PngInfo) -> bytes:
    buf = BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_recipe(image: Image.Image | str | Path) -> Recipe:
    """The recipe a PNG carries: our ``composer_recipe`` chunk, else a best-effort recipe from
    the ``parameters`` text that A1111 (and tools that copy it) write (``from_a1111``);
    ``RecipeError`` when it carries neither, or a broken one."""
    chunks = _chunks(image)
    text = chunks.get(RECIPE_CHUNK)
    if text is None and isinstance(chunks.get(PARAMETERS_CHUNK), str):
        return parse(from_a1111(chunks[PARAMETERS_CHUNK]))
    if text is None:
        raise RecipeError(
            f"image: it carries no {RECIPE_CHUNK!r} or {PARAMETERS_CHUNK!r} text chunk; only "
            "images made by Diffusion Composer or AUTOMATIC1111-style tools do"
        )
    return parse(text)


_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
"""One ``Key: value`` pair of the settings line: A1111's ``re_param_code``."""


def a1111_fields(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings) of a ``parameters`` text, split as A1111's
    ``parse_generation_parameters`` splits it: the last line is the settings when it holds at
    least three pairs; lines before ``Negative prompt:`` are the prompt, the rest the negative;
    each line stripped; a quoted value is JSON."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    settings = {}
    for key, value in _PARAM.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                value = value[1:-1]
        settings[key.strip()] = value
    return "\n".join(prompt), "\n".join(negative), settings


def from_a1111(text: str) -> dict:
    """A best-effort recipe (its JSON form) from A1111's ``parameters``: the prompt with its
    ``<lora:…>`` tags (which attach those LoRAs), the negative prompt, steps, sampler (with
    A1111's ``Schedule type``), CFG scale, seed, size and the model by name. A setting the recipe
    cannot hold (a sampler it lacks, a size that is not a multiple of 8) is left at its
    default; the rest of A1111's settings (hires fix, clip skip, …) have no place in a recipe
    (``not_carried`` names them, so that the page and ``composer info`` can say so)."""
    from composer import registry
    from composer.recipe import MAX_SEED, MAX_SIDE, MAX_STEPS, normalize_scheduler

    prompt, negative, settings = a1111_fields(text)
    sampler: dict = {}
    name = settings.get("Sampler", "")
    kind = settings.get("Schedule type", "")
    scheduler = normalize_scheduler(f"{name} {kind}") if kind and kind != "Automatic" else None
    if scheduler is None and name:
        scheduler = normalize_scheduler(name)
    if scheduler:
        sampler["scheduler"] = scheduler
    steps = _whole(settings.get("Steps"))
    if steps is not None and 1 <= steps <= MAX_STEPS:
        sampler["steps"] = steps
    cfg = _real(settings.get("CFG scale"))
    if cfg is not None and 0 <= cfg <= 50:
        sampler["guidance_scale"] = cfg
    seed = _whole(settings.get("Seed"))
    if seed is not None and 0 <= seed <= MAX_SEED:
        sampler["seed"] = seed
    width, _, height = settings.get("Size", "").partition("x")
    width, height = _whole(width), _whole(height)
    if all(v is not None and 16 <= v <= MAX_SIDE and v % 8 == 0 for v in (width, height)):
        sampler["width"], sampler["height"] = width, height
    model = settings.get("Model", "").strip()
    if "Composition" in settings:  # ours, naming every model of a composition: the first
        model = model.split(", ")[0]
    return {
        "prompt": prompt,
        "negative_prompt": negative,
        "method": "single",
        "experts": [{"model": model or registry.DEFAULT_MODEL}],
        "sampler": sampler,
    }


CARRIED = frozenset(
    {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model", "Composition"}
)
"""A1111 settings ``from_a1111`` turns into recipe fields."""
INFORMATIONAL = frozenset(
    {"Model hash", "Lora hashes", "TI hashes", "Version", "Batch size", "Batch pos", "VAE hash"}
)
"""Settings that describe the image rather than change it (hashes, versions, batch context)."""


def _chunks(image: Image.Image | str | Path) -> dict:
    """An image's text chunks (``RecipeError`` when a file is not a readable image)."""
    if isinstance(image, Image.Image):
        return dict(image.info)
    try:
        with Image.open(image) as opened:
            opened.load()
            return dict(opened.info)
    except (OSError, ValueError) as e:
        raise RecipeError(f"image: {str(image)!r} is not a readable image ({e})") from None


def not_carried(image: Image.Image | str | Path) -> list[str]:
    """The settings of an image made by AUTOMATIC1111 (or a tool that writes its text) that its
    recipe does not hold, e.g. ``Clip skip`` or ``Hires upscale``: what to tell a user whose
    restored controls may not remake that image. Empty for our own PNGs."""
    chunks = _chunks(image)
    text = chunks.get(PARAMETERS_CHUNK)
    if RECIPE_CHUNK in chunks or not isinstance(text, str):
        return []
    _, _, settings = a1111_fields(text)
    return [key for key in settings if key not in CARRIED | INFORMATIONAL]


def _whole(text: str | None) -> int | None:
    value = _real(text)
    return int(value) if value is not None and value.is_integer() else None


def _real(text: str | None) -> float | None:
    try:
        value = float((text or "").strip())
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None
