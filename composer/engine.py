"""Recipe → images, their PNG metadata and a per-step trace.

``generate`` runs a validated ``Recipe``: it resolves the experts through the registry, leases the
cached pipeline (so this request's LoRAs are the only active ones), builds a request-local
pipeline with its own scheduler over the shared modules (schedulers are not thread-safe) and samples
each image with its own generator seeded ``seed + i``. Images are made one at a time so that image
``i`` of a batch is bit-for-bit the image that its own PNG's recipe (seed ``seed + i``, one image)
makes again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from PIL import Image

from composer import registry
from composer.pnginfo import png_info
from composer.recipe import Recipe, RecipeError
from composer.schedulers import make_scheduler

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


IMPLEMENTED = ("single", "superpose")


def generate(
    recipe: Recipe,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    cache: registry.ModelCache | None = None,
) -> Result:
    """Run ``recipe``. Raises ``RecipeError`` for what the user must change and ``Cancelled``
    when ``cancel`` is set."""
    if recipe.method not in IMPLEMENTED:
        raise RecipeError(
            f"method: {recipe.method!r} is not available yet; available: " + ", ".join(IMPLEMENTED)
        )
    cache = cache or registry.CACHE
    sources, loras = _resolve(recipe)
    by_location = {src.location: src for src in sources}
    with ExitStack() as stack:
        leases = {loc: stack.enter_context(cache.lease(by_location[loc]))
                  for loc in sorted(by_location)}  # one lock order for every request
        for loc, lease in leases.items():
            lease.use_loras(loras[loc])
        if recipe.method == "single":
            return _sample_single(recipe, leases[sources[0].location].pipe, sources[0],
                                  progress, cancel)
        return _sample_superpose(recipe, sources, leases, progress, cancel)


def _resolve(recipe: Recipe) -> tuple[list[registry.Source], dict[str, list[tuple[str, float]]]]:
    """Each expert's model source, and the LoRAs each distinct model runs with.

    Experts that share a model share its U-Net module, so they must ask for the same LoRAs.
    """
    sources, loras, owner = [], {}, {}
    for i, expert in enumerate(recipe.experts):
        source = registry.resolve_model(expert.model, f"experts[{i}].model")
        wanted = [(registry.resolve_lora(lo.path, f"experts[{i}].loras[{j}].path"), lo.weight)
                  for j, lo in enumerate(expert.loras)]
        if source.location in loras and loras[source.location] != wanted:
            raise RecipeError(
                f"experts[{i}].loras: experts[{owner[source.location]}] and experts[{i}] use the "
                f"same model {expert.model!r} with different LoRAs; one model runs with one set "
                "of LoRAs per generation (give each LoRA variant its own model file)"
            )
        loras.setdefault(source.location, wanted)
        owner.setdefault(source.location, i)
        sources.append(source)
    return sources, loras


def native_size(pipe) -> tuple[int, int]:
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return side, side


def _sample_single(
    recipe: Recipe,
    shared_pipe,
    source: registry.Source,
    progress: Progress | None,
    cancel: threading.Event | None,
) -> Result:
    s = recipe.sampler
    pipe = type(shared_pipe).from_pipe(
        shared_pipe, scheduler=make_scheduler(s.scheduler, shared_pipe.scheduler.config)
    )
    pipe.set_progress_bar_config(disable=True)
    native_width, native_height = native_size(pipe)
    width, height = s.width or native_width, s.height or native_height

    def sample(seed: int, on_step):
        steps: list[dict] = []

        def record(p, step, timestep, kwargs):
            steps.append({"step": step + 1, "timestep": float(timestep)})
            return on_step(p, step, timestep, kwargs)

        image = pipe(
            prompt=recipe.expert_prompt(0),
            negative_prompt=recipe.negative_prompt or None,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance_scale,
            width=width,
            height=height,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            callback_on_step_end=record,
        ).images[0]
        return image, steps

    return _each_image(recipe, [source], str(pipe.device), progress, cancel, sample)


def _each_image(recipe: Recipe, sources: list[registry.Source], device: str,
                progress: Progress | None, cancel: threading.Event | None, sample) -> Result:
    """The loop every method shares: image i with seed ``seed + i``, progress over all images,
    cancel between steps, PNG metadata. ``sample(seed, on_step)`` makes one image and returns it
    with its per-step trace; ``on_step`` is a diffusers ``callback_on_step_end``."""
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
    model_hashes, lora_hashes = _hashes(recipe, sources)
    metadata = [png_info(recipe, i, model_hashes, lora_hashes) for i in range(len(images))]
    return Result(recipe=recipe, images=images, seeds=seeds, seconds=seconds, trace=trace,
                  metadata=metadata, device=device)


def _hashes(recipe: Recipe, sources: list[registry.Source]) -> tuple[dict, dict]:
    model_hashes = {}
    for source in sources:
        path = registry.model_file(source)
        if path is not None:
            model_hashes[source.reference] = registry.file_sha256(path)
    lora_hashes = {}
    for e in recipe.experts:
        for lo in e.loras:
            resolved = registry.resolve_lora(lo.path)
            if not registry.looks_like_hub_id(resolved):
                lora_hashes[lo.path] = registry.file_sha256(resolved, body_only=True)
    return model_hashes, lora_hashes


def _sample_superpose(recipe: Recipe, sources: list[registry.Source], leases: dict,
                      progress: Progress | None, cancel: threading.Event | None) -> Result:
    """SuperDiff (Skreta et al. 2025) through ``SuperpositionPipeline``: experts on one model
    share its U-Net and run in one batched call. The recipe's scheduler is not used: the
    density estimate needs the pipeline's own Euler–Maruyama steps (FIELD_NOTES, SuperDiff)."""
    from pipelines.superposition import SuperpositionPipeline

    order = list(dict.fromkeys(src.location for src in sources))
    pipes = [leases[loc].pipe for loc in order]
    try:
        pipe = SuperpositionPipeline.from_pipes(pipes)
    except ValueError as e:
        names = {src.location: src.reference for src in sources}
        message = str(e)
        for k, loc in enumerate(order):
            message = message.replace(f"pipes[{k}] ({loc}", f"{names[loc]!r} ({loc}")
        raise RecipeError(f"experts: {message}") from None
    pipe.set_progress_bar_config(disable=True)
    settings = recipe.superpose
    mode = settings.mode if settings else "or"
    experts = [(order.index(src.location), recipe.expert_prompt(i))
               for i, src in enumerate(sources)]
    s = recipe.sampler
    native_width, native_height = native_size(pipes[0])
    width, height = s.width or native_width, s.height or native_height

    def sample(seed: int, on_step):
        out = pipe(
            experts=experts,
            negative_prompt=recipe.negative_prompt or None,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance_scale,
            generator=torch.Generator(device=pipe.device).manual_seed(seed),
            height=height,
            width=width,
            mode=mode,
            temperature=settings.temperature if settings else 1.0,
            bias=list(settings.bias) if settings and settings.bias else None,
            callback_on_step_end=on_step,
        )
        steps = [
            {"step": k + 1, "kappa": out.kappa[k, :, 0].tolist(),
             "log_density": out.log_density[k + 1, :, 0].tolist()}
            for k in range(out.kappa.shape[0])
        ]
        return out.images[0], steps

    return _each_image(recipe, sources, str(pipe.device), progress, cancel, sample)
