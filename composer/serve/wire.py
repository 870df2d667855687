"""What crosses Ray between the page and a ``Composer`` replica, and the multiplex id.

A request is the recipe's JSON; an answer is a plain dict of picklable values (``pack``) that
``unpack`` turns back into an ``engine.Result``. Images travel as PNG bytes: lossless, so the
pixels a client gets are the pixels the replica made, and a fraction of a raw array's size. The
PNG text chunks (the recipe, A1111 ``parameters``) travel as the ``PngInfo`` they came from.
"""

from __future__ import annotations

from io import BytesIO

from PIL import Image

from composer.methods import METHODS
from composer.methods.sampling import Result
from composer.recipe import Recipe, parse
from composer.sharing.pnginfo import png_bytes


def model_set(recipe: Recipe) -> str:
    """The multiplex id of ``recipe``: its checkpoints (experts' models and any other model the
    method names, such as a merge's base), sorted and joined by ``+``. LoRAs are not part of it:
    a replica switches them per request on the pipelines it holds (``registry.Lease``), which
    costs little, while loading a checkpoint is what affinity saves."""
    method = METHODS[recipe.method]
    models = {expert.model for expert in recipe.experts} | set(method.models(recipe).values())
    return "+".join(sorted(models))


def pack(result: Result) -> dict:
    """``result`` as plain picklable values (tensors on the CPU)."""
    return {
        "recipe": result.recipe.to_json(indent=None),
        "pngs": [
            png_bytes(image, info)
            for image, info in zip(result.images, result.metadata, strict=True)
        ],
        "metadata": result.metadata,
        "seeds": list(result.seeds),
        "seconds": list(result.seconds),
        "trace": result.trace,
        "device": result.device,
        "merge_seconds": result.merge_seconds,
        "batch_size": result.batch_size,
        "maps": [{k: v.cpu() for k, v in m.items()} for m in result.maps],
    }


def unpack(packed: dict) -> Result:
    """The ``Result`` that ``pack`` was given, images decoded from their PNG bytes."""
    images = []
    for data in packed["pngs"]:
        image = Image.open(BytesIO(data))
        image.load()
        images.append(image)
    return Result(
        recipe=parse(packed["recipe"]),  # as the replica ran it; its models were checked there
        images=images,
        seeds=packed["seeds"],
        seconds=packed["seconds"],
        trace=packed["trace"],
        metadata=packed["metadata"],
        device=packed["device"],
        merge_seconds=packed["merge_seconds"],
        batch_size=packed["batch_size"],
        maps=packed["maps"],
    )
