"""AFA (Wang et al., ICLR 2025): the experts' U-Nets walked in lock-step, their block features
blended after every block by a trained Spatial-Aware Block-Wise aggregator
(``pipelines.aggregation``), or averaged when the recipe names none."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from composer.methods.method import Control, Form, Method, Values
from composer.methods.superpose import PAGE_EXPERTS, default_experts
from composer.recipe import MAX_EXPERTS, Fields, RecipeError

if TYPE_CHECKING:
    from composer.methods.sampling import Job, Result


@dataclass(frozen=True)
class Aggregate:
    aggregator: str | None = None


def parse_section(obj: Fields, n_experts: int) -> Aggregate:
    return Aggregate(aggregator=obj.reference("aggregator", default=None, nullable=True))


def check(recipe) -> None:
    if any(recipe.expert_loras(i) for i in range(len(recipe.experts))):
        raise RecipeError(
            "experts: LoRAs on the experts of an aggregate are not supported: an aggregator is "
            "trained for its experts' weights; merge the LoRA into a checkpoint first"
        )


def references(recipe) -> list[tuple[str, str, str]]:
    name = METHOD.settings(recipe).aggregator
    return [] if name is None else [("aggregator", name, "aggregate.aggregator")]


def run(job: Job) -> Result:
    """The recipe's scheduler is used; CFG acts on the blended prediction."""

    from composer import registry
    from composer.embeddings import apply as apply_embeddings
    from composer.methods.batches import each_batch
    from composer.methods.sampling import pipe_arguments, recorder
    from composer.prompts import strip
    from composer.schedulers import make_scheduler
    from pipelines.aggregation import AggregationPipeline

    recipe, sources = job.recipe, job.sources
    for lease in job.leases.values():
        lease.use_loras([])
    pipes = [job.pipe(i) for i in range(len(sources))]
    names = [src.reference for src in sources]
    if len({registry.latent_signature(p) for p in pipes}) > 1:
        raise RecipeError(
            f"experts: {names[0]!r} and another expert have different latent spaces (VAE); "
            "aggregated experts must share one"
        )
    settings = METHOD.settings(recipe)
    aggregator = None
    if settings.aggregator is not None:
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
    apply_embeddings(ensemble, job)
    prompts = [recipe.expert_prompt(i) for i in range(len(sources))]
    # Experts with prompts of their own read their part; the aggregators read the whole image's
    # prompt (the recipe's), which says where each part goes.
    own = any(e.prompt is not None for e in recipe.experts)
    aggregator_prompt = strip(recipe.prompt) if own and recipe.prompt else None
    all_maps: list[dict] = []

    def batch(seeds: list[int], on_step):
        steps, record = recorder(on_step)
        out = ensemble(
            prompts,
            aggregator_prompt=aggregator_prompt,
            return_maps=True,
            **pipe_arguments(job, pipes[0], seeds, record),
        )
        traces = []
        for b in range(len(seeds)):
            image_steps, image_maps = [dict(step) for step in steps], {}
            for name, maps in zip(out.point_names, out.maps, strict=True):
                weights = maps[:, b].float().mean(dim=(2, 3))  # (steps, N): mean per expert
                for k, row in enumerate(weights.tolist()):
                    image_steps[k].setdefault("aggregation", {})[name] = [round(w, 4) for w in row]
                image_maps[name] = maps[:, b].float().mean(dim=0)
            all_maps.append(image_maps)
            traces.append(image_steps)
        return out.images, traces

    result = each_batch(job, str(ensemble.device), batch, pipes[0], passes=len(sources))
    result.maps = all_maps
    return result


def default_aggregator() -> str:
    """The tab's first aggregator: the bundled one, else none (uniform averaging)."""
    from composer import registry

    return next(iter(registry.bundled("aggregators")), "")


def aggregator_experts(reference: str) -> list[str]:
    """The experts an aggregator was trained for, in order (``[]`` for none or unknown)."""
    from composer import registry

    if not reference:
        return []
    try:
        config = Path(registry.resolve_aggregator(reference)) / "config.json"
        return list(json.loads(config.read_text()).get("expert_names", []))
    except (RecipeError, OSError, ValueError):
        return []


def read(values: Values) -> dict:
    experts = [
        {"model": r["model"], "loras": [], "prompt": r["prompt"] or None, "weight": 1.0}
        for r in values["rows"]
    ]
    return {"experts": experts, "aggregate": {"aggregator": values["aggregator"] or None}}


def write(recipe) -> Values | None:
    if len(recipe.experts) > PAGE_EXPERTS or any(
        e.loras or e.weight != 1.0 for e in recipe.experts
    ):
        return None
    return {
        "aggregator": METHOD.settings(recipe).aggregator or "",
        "rows": [{"model": e.model, "prompt": e.prompt or ""} for e in recipe.experts],
    }


def _row_default(k: int) -> Values:
    first = aggregator_experts(default_aggregator()) or default_experts()
    return {"model": (first + default_experts())[k]}


INTRO = (
    "AFA (Wang et al., ICLR 2025): the experts' U-Nets run side by side and, after every block, "
    "a trained **aggregator** decides per pixel which expert's features to trust. Experts need "
    "the same architecture; an aggregator works only for the experts it was trained for, in that "
    "order (picking one fills them in). Without one the features are averaged. To compose a "
    "picture from parts, give each expert its own prompt and describe the whole in the main "
    "prompt, which is what the aggregator reads (toy-warm-cool: “a red circle” and “a blue "
    "square” under “a red circle and a blue square”, 64×32)."
)

METHOD = Method(
    name="aggregate",
    summary="AFA: the U-Nets' block features blended by a trained aggregator",
    experts=(2, MAX_EXPERTS),
    run=run,
    section=Aggregate,
    parse_section=parse_section,
    check=check,
    references=references,
    unet_calls=lambda recipe: len(recipe.experts),
    form=Form(
        tab="Aggregate",
        intro=INTRO,
        read=read,
        write=write,
        controls=(
            Control(
                "aggregator",
                "aggregator",
                "Aggregator",
                default=default_aggregator,
                choices=(("none: uniform feature averaging", ""),),
                info="A bundled aggregator or a folder made by training one",
                fills_rows=aggregator_experts,
            ),
        ),
        row=(
            Control("model", "model", "Expert"),
            Control(
                "prompt",
                "text",
                "Prompt (empty: main prompt)",
                "",
                info="Its own part of the picture; the aggregator reads the main prompt",
            ),
        ),
        rows=PAGE_EXPERTS,
        row_default=_row_default,
    ),
)
