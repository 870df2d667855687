"""What every method's runner shares: the request (``Job``), the pipeline arguments of a batch,
the trace recorder and the ``Result``; the loop over batches is ``composer.methods.batches``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from composer import registry
from composer.checkpoints.hashing import file_sha256, model_file
from composer.recipe import Recipe, RecipeError, looks_like_hub_id

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
    batch_size: int = 1
    """How many images one pipeline call sampled (the last, if an out-of-memory error halved it)."""
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
    embeddings: list[tuple[str, str]] = field(default_factory=list)
    """(token, file) of each textual-inversion embedding the prompts use
    (``composer.embeddings``)."""

    def pipe(self, i: int):
        """Expert ``i``'s cached pipeline."""
        return self.leases[self.sources[i].location].pipe

    def size(self, pipe) -> tuple[int, int]:
        """The recipe's width and height, each the model's native side where it gives none."""
        native_width, native_height = native_size(pipe)
        s = self.recipe.sampler
        return s.width or native_width, s.height or native_height


def pipe_arguments(job: Job, pipe, seeds: list[int], on_step, device: str = "cpu") -> dict:
    """What every method passes its pipeline for one batch, as diffusers names it: the negative
    prompt, steps, guidance, size (the model's own where the recipe gives none), one generator
    per image (seeded ``seeds[i]``, on ``device``) and the step callback."""
    recipe, s = job.recipe, job.recipe.sampler
    width, height = job.size(pipe)
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    return {
        "negative_prompt": recipe.negative_prompt or None,
        "num_inference_steps": s.steps,
        "guidance_scale": s.guidance_scale,
        "width": width,
        "height": height,
        "num_images_per_prompt": len(seeds),
        "generator": generators[0] if len(generators) == 1 else generators,
        "callback_on_step_end": on_step,
    }


def native_size(pipe) -> tuple[int, int]:
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return side, side


def recorder(on_step):
    """A fresh per-step trace (the same for every image of a batch) and a
    ``callback_on_step_end`` that fills it, then calls ``on_step`` (progress and cancel)."""
    steps: list[dict] = []

    def record(p, step, timestep, kwargs):
        steps.append({"step": step + 1, "timestep": float(timestep)})
        return on_step(p, step, timestep, kwargs)

    return steps, record


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


def hashes(
    recipe: Recipe, sources: list[registry.Source], embeddings: list[tuple[str, str]] = ()
) -> tuple[dict, dict, dict]:
    """sha256 of each model file, each LoRA file's body and each used embedding file, by
    reference (embeddings: by token), for PNG info (``composer.sharing.pnginfo``)."""
    model_hashes = {}
    for source in sources:
        path = model_file(source)
        if path is not None:
            model_hashes[source.reference] = file_sha256(path)
    lora_hashes = {}
    for i in range(len(recipe.experts)):
        for lo in recipe.expert_loras(i):
            resolved = registry.resolve_lora(lo.path)
            if not looks_like_hub_id(resolved):
                lora_hashes[lo.path] = file_sha256(resolved, body_only=True)
    embedding_hashes = {token: file_sha256(path) for token, path in embeddings}
    return model_hashes, lora_hashes, embedding_hashes
