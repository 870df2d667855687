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
from composer.recipe import Merge, Recipe, RecipeError
from composer.schedulers import make_scheduler
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


def generate(
    recipe: Recipe,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    cache: registry.ModelCache | None = None,
) -> Result:
    """Run ``recipe``. Raises ``RecipeError`` for what the user must change and ``Cancelled``
    when ``cancel`` is set."""
    cache = cache or registry.CACHE
    sources, loras = _resolve(recipe)
    base = None
    if recipe.method == "merge":
        from composer.merge.plan import check_settings

        settings = recipe.merge or Merge()
        check_settings(settings, len(sources), settings.base is not None)
        if settings.base is not None:
            base = registry.resolve_model(settings.base, "merge.base")
    if recipe.method == "aggregate" and any(loras):
        raise RecipeError(
            "experts: LoRAs on the experts of an aggregate are not supported: an aggregator is "
            "trained for its experts' weights; merge the LoRA into a checkpoint first"
        )
    by_location = {src.location: src for src in [*sources, *([base] if base else [])]}
    with ExitStack() as stack:
        leases = {
            loc: stack.enter_context(cache.lease(by_location[loc])) for loc in sorted(by_location)
        }  # one lock order for every request
        if recipe.method == "single":
            leases[sources[0].location].use_loras(loras[0])
            return _sample_single(
                recipe, leases[sources[0].location].pipe, sources[0], progress, cancel
            )
        if recipe.method == "merge":
            return _sample_merge(recipe, sources, loras, base, leases, progress, cancel)
        if recipe.method == "aggregate":
            return _sample_aggregate(recipe, sources, leases, progress, cancel)
        return _sample_superpose(recipe, sources, loras, leases, progress, cancel)


def _resolve(recipe: Recipe) -> tuple[list[registry.Source], list[list[tuple[str, float]]]]:
    """Each expert's model source and its LoRAs (resolved path, strength)."""
    sources, loras = [], []
    for i, expert in enumerate(recipe.experts):
        sources.append(registry.resolve_model(expert.model, f"experts[{i}].model"))
        loras.append(
            [
                (registry.resolve_lora(lo.path, f"experts[{i}].loras[{j}].path"), lo.weight)
                for j, lo in enumerate(expert.loras)
            ]
        )
    return sources, loras


def native_size(pipe) -> tuple[int, int]:
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return side, side


def _sample_merge(
    recipe: Recipe,
    sources: list[registry.Source],
    loras: list[list[tuple[str, float]]],
    base: registry.Source | None,
    leases: dict,
    progress: Progress | None,
    cancel: threading.Event | None,
) -> Result:
    """Live weight merge (issue 5): the experts' cached U-Nets and text encoders, each with its
    LoRAs baked in, merged on their device into scratch modules (``composer.merge.live``),
    sampled with the first expert's VAE and scheduler."""
    from composer.merge.live import merged_model
    from composer.merge.plan import COMPONENTS

    def components(src: registry.Source) -> dict:
        pipe = leases[src.location].pipe
        return {c: getattr(pipe, c) for c in COMPONENTS if getattr(pipe, c, None) is not None}

    for lease in leases.values():
        lease.use_loras([])  # every LoRA is baked into the merge
    experts = [
        (src.reference, components(src), e.weight)
        for src, e in zip(sources, recipe.experts, strict=True)
    ]
    files = [
        [(f"experts[{i}].loras[{j}].path", path, s) for j, (path, s) in enumerate(mine)]
        for i, mine in enumerate(loras)
    ]
    base_model = (base.reference, components(base)) if base else None
    first = leases[sources[0].location].pipe
    with merged_model(recipe.merge or Merge(), experts, base_model, files) as merged:
        result = _sample_single(recipe, first, sources, progress, cancel, merged.modules)
    result.merge_seconds = merged.seconds
    return result


def _sample_single(
    recipe: Recipe,
    shared_pipe,
    source: registry.Source | list[registry.Source],
    progress: Progress | None,
    cancel: threading.Event | None,
    components: dict | None = None,
) -> Result:
    s = recipe.sampler
    pipe = type(shared_pipe).from_pipe(
        shared_pipe,
        scheduler=make_scheduler(s.scheduler, shared_pipe.scheduler.config),
        **(components or {}),
    )
    pipe.set_progress_bar_config(disable=True)
    native_width, native_height = native_size(pipe)
    width, height = s.width or native_width, s.height or native_height

    def sample(seed: int, on_step):
        steps, record = _recorder(on_step)
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

    sources = source if isinstance(source, list) else [source]
    return _each_image(recipe, sources, str(pipe.device), progress, cancel, sample)


def _recorder(on_step):
    """A fresh per-image trace and a ``callback_on_step_end`` that fills it, then calls
    ``on_step`` (progress and cancel)."""
    steps: list[dict] = []

    def record(p, step, timestep, kwargs):
        steps.append({"step": step + 1, "timestep": float(timestep)})
        return on_step(p, step, timestep, kwargs)

    return steps, record


def _each_image(
    recipe: Recipe,
    sources: list[registry.Source],
    device: str,
    progress: Progress | None,
    cancel: threading.Event | None,
    sample,
) -> Result:
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
    return Result(
        recipe=recipe,
        images=images,
        seeds=seeds,
        seconds=seconds,
        trace=trace,
        metadata=metadata,
        device=device,
    )


def _expert_adapters(
    sources: list[registry.Source], loras: list[list[tuple[str, float]]], leases: dict
) -> list[tuple | None]:
    """Per expert, the adapters the pipeline activates for it: ``None`` where every expert on
    that model has the same LoRAs (activated once here), else its own (name, strength) pairs."""
    adapters: list[tuple | None] = [None] * len(sources)
    for loc in dict.fromkeys(src.location for src in sources):
        mine = [i for i, src in enumerate(sources) if src.location == loc]
        lease = leases[loc]
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


def _sample_superpose(
    recipe: Recipe,
    sources: list[registry.Source],
    loras: list[list[tuple[str, float]]],
    leases: dict,
    progress: Progress | None,
    cancel: threading.Event | None,
) -> Result:
    """SuperDiff (Skreta et al. 2025) through ``SuperpositionPipeline``: experts on one model
    with the same LoRAs share its U-Net and run in one batched call; LoRA variants of one model
    share its U-Net too, with their adapters switched per call. The recipe's scheduler is not
    used: the density estimate needs the pipeline's own Euler–Maruyama steps (FIELD_NOTES)."""
    from pipelines.superposition import SuperpositionPipeline

    adapters = _expert_adapters(sources, loras, leases)

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
    experts = [
        (order.index(src.location), recipe.expert_prompt(i), adapters[i])
        for i, src in enumerate(sources)
    ]
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
            temperature=settings.temperature if settings else None,
            bias=list(settings.bias) if settings and settings.bias else None,
            callback_on_step_end=on_step,
        )
        steps = [
            {
                "step": k + 1,
                "kappa": out.kappa[k, :, 0].tolist(),
                "log_density": out.log_density[k + 1, :, 0].tolist(),
            }
            for k in range(out.kappa.shape[0])
        ]
        return out.images[0], steps

    return _each_image(recipe, sources, str(pipe.device), progress, cancel, sample)


def _sample_aggregate(
    recipe: Recipe,
    sources: list[registry.Source],
    leases: dict,
    progress: Progress | None,
    cancel: threading.Event | None,
) -> Result:
    """AFA (Wang et al. 2025) through ``AggregationPipeline``: the experts' U-Nets walked in
    lock-step, blended after every block by the recipe's aggregator, or averaged uniformly
    when it names none. The recipe's scheduler is used, CFG acts on the blended prediction."""
    from pipelines.aggregation import AggregationPipeline

    for lease in leases.values():
        lease.use_loras([])
    pipes = [leases[src.location].pipe for src in sources]
    names = [src.reference for src in sources]
    if len({registry.latent_signature(p) for p in pipes}) > 1:
        raise RecipeError(
            f"experts: {names[0]!r} and another expert have different latent spaces (VAE); "
            "aggregated experts must share one"
        )
    settings = recipe.aggregate
    aggregator = None
    if settings is not None and settings.aggregator is not None:
        aggregator = registry.load_aggregator(
            registry.resolve_aggregator(settings.aggregator, "aggregate.aggregator"),
            pipes[0].device,
            pipes[0].unet.dtype,
        )
    try:
        ensemble = AggregationPipeline.from_pipes(pipes, aggregator, names)
    except ValueError as e:
        raise RecipeError(f"experts: {e}") from None
    s = recipe.sampler
    ensemble.scheduler = make_scheduler(s.scheduler, pipes[0].scheduler.config)
    ensemble.set_progress_bar_config(disable=True)
    native_width, native_height = native_size(pipes[0])
    width, height = s.width or native_width, s.height or native_height
    prompts = [recipe.expert_prompt(i) for i in range(len(sources))]
    # Experts with prompts of their own read their part; the aggregators read the whole image's
    # prompt (the recipe's), which says where each part goes.
    own = any(e.prompt is not None for e in recipe.experts)
    aggregator_prompt = recipe.prompt if own and recipe.prompt else None

    def sample(seed: int, on_step):
        steps, record = _recorder(on_step)
        out = ensemble(
            prompts,
            aggregator_prompt=aggregator_prompt,
            negative_prompt=recipe.negative_prompt or None,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance_scale,
            width=width,
            height=height,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            callback_on_step_end=record,
            return_maps=True,
        )
        image_maps = {}
        for name, maps in zip(out.point_names, out.maps, strict=True):
            weights = maps[:, 0].float().mean(dim=(2, 3))  # (steps, N): mean weight per expert
            for k, row in enumerate(weights.tolist()):
                steps[k].setdefault("aggregation", {})[name] = [round(w, 4) for w in row]
            image_maps[name] = maps[:, 0].float().mean(dim=0)
        all_maps.append(image_maps)
        return out.images[0], steps

    all_maps: list[dict[str, torch.Tensor]] = []
    result = _each_image(recipe, sources, str(ensemble.device), progress, cancel, sample)
    result.maps = all_maps
    return result
