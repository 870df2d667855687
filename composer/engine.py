"""Recipe → images, their PNG metadata and a per-step trace; recipe → one checkpoint file.

``generate`` runs a validated ``Recipe``: it resolves the experts (and any other model the method
names, such as a merge's base) through the registry, leases the cached pipelines in one lock
order (so this request's LoRAs are the only active ones) and hands the request to the method's
runner (``composer.methods``). Each runner builds request-local pipelines over the shared modules
and samples each image with its own generator seeded ``seed + i``.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from pathlib import Path

from composer import registry
from composer.embeddings import resolve as resolve_embeddings
from composer.methods.sampling import Cancelled, Job, Progress, Result
from composer.recipe import Recipe, RecipeError

__all__ = ["Cancelled", "Progress", "Result", "export", "generate"]


def generate(
    recipe: Recipe,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    cache: registry.ModelCache | None = None,
) -> Result:
    """Run ``recipe``. Raises ``RecipeError`` for what the user must change and ``Cancelled``
    when ``cancel`` is set."""
    from composer.methods import METHODS

    method = METHODS[recipe.method]
    cache = cache or registry.CACHE
    sources, loras = _resolve(recipe)
    embeddings = resolve_embeddings(recipe)
    if method.check is not None:
        method.check(recipe)
    models = {
        where: registry.resolve_model(reference, where)
        for where, reference in method.models(recipe).items()
    }
    by_location = {src.location: src for src in [*sources, *models.values()]}
    placed = method.place(recipe) if method.place is not None else {}
    device = {src.location: placed[src.reference] for src in sources if src.reference in placed}
    with ExitStack() as stack:
        leases = {
            loc: stack.enter_context(cache.lease(by_location[loc], device.get(loc)))
            for loc in sorted(by_location)
        }  # one lock order for every request
        job = Job(recipe, sources, loras, leases, models, progress, cancel, embeddings)
        return method.run(job)


def export(recipe: Recipe, out: str | Path, dtype: str = "fp16") -> dict:
    """Write the model ``recipe`` samples (a merge, or one model with its LoRAs baked in) as
    one ``.safetensors`` checkpoint; what ``composer.export.export`` returns."""
    from composer.methods import METHODS

    method = METHODS[recipe.method]
    if method.export is None:
        exportable = ", ".join(name for name, m in METHODS.items() if m.export is not None)
        raise RecipeError(
            f"method: {recipe.method!r} makes no single model to export; expected one of "
            f"{exportable}"
        )
    return method.export(recipe.untagged(), out, dtype)  # exports read only listed LoRAs


def _resolve(recipe: Recipe) -> tuple[list[registry.Source], list[list[tuple[str, float]]]]:
    """Each expert's model source and its LoRAs (resolved path, strength): those listed, then
    those its prompt names in ``<lora:…>`` tags."""
    sources, loras = [], []
    for i, expert in enumerate(recipe.experts):
        sources.append(registry.resolve_model(expert.model, f"experts[{i}].model"))
        mine = []
        for j, lo in enumerate(recipe.expert_loras(i)):
            where = (
                f"experts[{i}].loras[{j}].path"
                if j < len(expert.loras)
                else f"experts[{i}]: the prompt tag <lora:{lo.path}>"
            )
            mine.append((registry.resolve_lora(lo.path, where), lo.weight))
        loras.append(mine)
    return sources, loras
