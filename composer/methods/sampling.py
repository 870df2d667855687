"""What every method's runner shares: the request (``Job``), the per-image loop, the trace
recorder and the ``Result``.

Images are made one at a time so that image ``i`` of a batch is bit-for-bit the image that its
own PNG's recipe (seed ``seed + i``, one image) makes again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from composer import registry
from composer.checkpoints.hashing import file_sha256, model_file
from composer.recipe import Recipe, RecipeError
from composer.sharing.pnginfo import png_info

Progress = Callable[[int, int], None]
"""``progress(done, total)``: steps done so far over all images of the request."""


class Cancelled(Exception):
    """The request was cancelled; ``images`` holds those finished before the cancel."""

    def __init__(self, images: list[Image.Image]):
        super().__init__(f"cancelled after {len(images)} image(s)")
        self.images = images


@dataclass
class Result:
    recipe: Recipe
    images: list[Image.Image]
    seeds: list[int]
    seconds: list[float]
    trace: list[list[dict]] = field(default_factory=list)
    """One list per image, one dict per step: ``{"step", "timestep"}`` (+ method extras)."""
    metadata: list = field(default_factory=list)
    """One ``PngInfo`` per image (``composer_recipe`` + A1111 ``parameters``)."""
    device: str = ""
    merge_seconds: float | None = None
    """``merge``: seconds spent merging weights (0.0 when the live merge was reused)."""
    maps: list[dict[str, torch.Tensor]] = field(default_factory=list)
    """``aggregate``: per image, per aggregation point, each expert's weight at every pixel of
    that point's features averaged over the steps, (N, h, w)."""


@dataclass
class Job:
    """One request as a runner sees it: the recipe, each expert's resolved model and LoRAs, the
    leases on the cached pipelines (this request's LoRAs are the only active ones), the other
    models the method named (``Method.models``) and the caller's progress and cancel."""

    recipe: Recipe
    sources: list[registry.Source]
    loras: list[list[tuple[str, float]]]
    leases: dict[str, registry.Lease]
    models: dict[str, registry.Source]
    progress: Progress | None = None
    cancel: threading.Event | None = None

    def pipe(self, i: int):
        """Expert ``i``'s cached pipeline."""
        return self.leases[self.sources[i].location].pipe

    def size(self, pipe) -> tuple[int, int]:
        """The recipe's width and height, each the model's native side where it gives none."""
        native_width, native_height = native_size(pipe)
        s = self.recipe.sampler
        return s.width or native_width, s.height or native_height


def pipe_arguments(job: Job, pipe, seed: int, on_step, device: str = "cpu") -> dict:
    """What every method passes its pipeline for one image, as diffusers names it: the negative
    prompt, steps, guidance, size (the model's own where the recipe gives none), the image's
    generator (seeded ``seed``, on ``device``) and the step callback."""
    recipe, s = job.recipe, job.recipe.sampler
    width, height = job.size(pipe)
    return {
        "negative_prompt": recipe.negative_prompt or None,
        "num_inference_steps": s.steps,
        "guidance_scale": s.guidance_scale,
        "width": width,
        "height": height,
        "generator": torch.Generator(device=device).manual_seed(seed),
        "callback_on_step_end": on_step,
    }


def native_size(pipe) -> tuple[int, int]:
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return side, side


def recorder(on_step):
    """A fresh per-image trace and a ``callback_on_step_end`` that fills it, then calls
    ``on_step`` (progress and cancel)."""
    steps: list[dict] = []

    def record(p, step, timestep, kwargs):
        steps.append({"step": step + 1, "timestep": float(timestep)})
        return on_step(p, step, timestep, kwargs)

    return steps, record


def each_image(job: Job, device: str, sample) -> Result:
    """The loop every method shares: image i with seed ``seed + i``, progress over all images,
    cancel between steps, PNG metadata. ``sample(seed, on_step)`` makes one image and returns it
    with its per-step trace; ``on_step`` is a diffusers ``callback_on_step_end``."""
    recipe, progress, cancel = job.recipe, job.progress, job.cancel
    s = recipe.sampler
    total = s.steps * s.num_images
    images, seeds, seconds, trace = [], [], [], []
    for i in range(s.num_images):

        def on_step(p, step, timestep, kwargs, i=i):
            if progress is not None:
                progress(i * s.steps + step + 1, total)
            if cancel is not None and cancel.is_set():
                p._interrupt = True
            return kwargs

        seed = s.seed + i
        start = time.perf_counter()
        image, steps = sample(seed, on_step)
        if cancel is not None and cancel.is_set():
            raise Cancelled(images)
        seconds.append(time.perf_counter() - start)
        images.append(image)
        seeds.append(seed)
        trace.append(steps)
    from composer.methods import METHODS

    model_hashes, lora_hashes = _hashes(recipe, job.sources)
    sampler = METHODS[recipe.method].sampler
    metadata = [png_info(recipe, i, model_hashes, lora_hashes, sampler) for i in range(len(images))]
    return Result(
        recipe=recipe,
        images=images,
        seeds=seeds,
        seconds=seconds,
        trace=trace,
        metadata=metadata,
        device=device,
    )


def expert_adapters(job: Job) -> list[tuple | None]:
    """Per expert, the adapters the pipeline activates for it: ``None`` where every expert on
    that model has the same LoRAs (activated once here), else its own (name, strength) pairs."""
    sources, loras = job.sources, job.loras
    adapters: list[tuple | None] = [None] * len(sources)
    for loc in dict.fromkeys(src.location for src in sources):
        mine = [i for i, src in enumerate(sources) if src.location == loc]
        lease = job.leases[loc]
        if all(loras[i] == loras[mine[0]] for i in mine):
            lease.use_loras(loras[mine[0]])
            continue
        needed = {path for i in mine for path, _ in loras[i]}
        if len(needed) > registry.MAX_ADAPTERS:
            raise RecipeError(
                f"experts: the experts on {sources[mine[0]].reference!r} use {len(needed)} "
                f"different LoRAs; at most {registry.MAX_ADAPTERS} per model in one generation"
            )
        for i in mine:
            adapters[i] = lease.load_loras(loras[i], keep=needed)
    return adapters


def _hashes(recipe: Recipe, sources: list[registry.Source]) -> tuple[dict, dict]:
    model_hashes = {}
    for source in sources:
        path = model_file(source)
        if path is not None:
            model_hashes[source.reference] = file_sha256(path)
    lora_hashes = {}
    for e in recipe.experts:
        for lo in e.loras:
            resolved = registry.resolve_lora(lo.path)
            if not registry.looks_like_hub_id(resolved):
                lora_hashes[lo.path] = file_sha256(resolved, body_only=True)
    return model_hashes, lora_hashes
