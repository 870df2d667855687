"""Weight merging: the experts' U-Nets and text encoders merged live on the cached models (or
exported, tensor by tensor), then sampled as one model. The merge methods themselves are
declared once in ``composer.merge.registry``; this module reads the recipe's ``merge`` section
from those declarations and runs it."""

from __future__ import annotations

import re
from contextlib import ExitStack
from dataclasses import asdict
from typing import TYPE_CHECKING

from composer.merge.registry import MERGE_METHODS, PARAMS, Merge, MergeError
from composer.merge.registry import check as check_settings
from composer.methods.method import Control, Form, Method, Values
from composer.methods.single import sample
from composer.methods.superpose import PAGE_EXPERTS, default_experts
from composer.recipe import MAX_EXPERTS, Fields, RecipeError

if TYPE_CHECKING:
    from composer import registry
    from composer.methods.sampling import Job, Result

GPU_SECONDS_PER_MERGED_EXPERT = 10
"""Reading one expert's U-Net into a live merge (TIES' thresholds included)."""


def parse_section(obj: Fields, n_experts: int) -> Merge:
    method = obj.choice("method", tuple(MERGE_METHODS), default="weighted_sum")
    base = obj.reference("base", default=None, nullable=True)
    params = {}
    for p in PARAMS.values():
        if p.choices:
            params[p.attr] = obj.choice(p.name, p.values, p.default)
        elif p.integer:
            params[p.attr] = obj.integer(p.name, default=p.default, low=p.low, high=p.high)
        else:
            params[p.attr] = obj.number(p.name, default=p.default, low=p.low, high=p.high)
    return Merge(
        method=method,
        base=base,
        block_weights=obj.numbers("block_weights", default=None, low=-10.0, high=10.0),
        overrides=tuple(
            _override(f"{obj.where}.overrides[{j}]", o)
            for j, o in enumerate(obj.array("overrides", default=[], high=64))
        ),
        **params,
    )


def _override(where: str, data) -> tuple[str, float]:
    obj = Fields(where, data)
    pattern = obj.text("pattern", required=True)
    try:
        re.compile(pattern)
    except re.error as e:
        raise RecipeError(
            f"{where}.pattern: {pattern!r} is not accepted; expected a Python regular "
            f"expression ({e})"
        ) from None
    weight = obj.number("weight", default=1.0, low=-10.0, high=10.0)
    obj.done()
    return pattern, weight


def section_json(settings: Merge) -> dict:
    merge = asdict(settings)
    merge["lambda"] = merge.pop("lambda_")
    merge["block_weights"] = (
        None if settings.block_weights is None else list(settings.block_weights)
    )
    merge["overrides"] = [{"pattern": p, "weight": w} for p, w in settings.overrides]
    return merge


def check(recipe) -> None:
    settings = METHOD.settings(recipe)
    try:
        check_settings(settings, len(recipe.experts), settings.base is not None)
    except MergeError as e:
        raise RecipeError(str(e)) from None


def models(recipe) -> dict[str, str]:
    base = METHOD.settings(recipe).base
    return {} if base is None else {"merge.base": base}


def run(job: Job) -> Result:
    """Live weight merge: the experts' cached U-Nets and text encoders, each with its LoRAs
    baked in, merged on their device into scratch modules (``composer.merge.live``), sampled
    with the first expert's VAE and scheduler."""
    from composer.merge.live import merged_model
    from composer.merge.plan import COMPONENTS

    def components(src: registry.Source) -> dict:
        pipe = job.leases[src.location].pipe
        return {c: getattr(pipe, c) for c in COMPONENTS if getattr(pipe, c, None) is not None}

    for lease in job.leases.values():
        lease.use_loras([])  # every LoRA is baked into the merge
    recipe, base = job.recipe, job.models.get("merge.base")
    experts = [
        (src.reference, components(src), e.weight)
        for src, e in zip(job.sources, recipe.experts, strict=True)
    ]
    files = [
        [(f"experts[{i}].loras[{j}].path", path, s) for j, (path, s) in enumerate(mine)]
        for i, mine in enumerate(job.loras)
    ]
    base_model = (base.reference, components(base)) if base else None
    settings = METHOD.settings(recipe)
    fishers = fisher_estimates(job, settings) if settings.method == "fisher" else None
    with ExitStack() as stack:
        try:
            merged = stack.enter_context(
                merged_model(settings, experts, base_model, files, fishers)
            )
        except MergeError as e:
            raise RecipeError(str(e)) from None
        result = sample(job, job.pipe(0), merged.modules)
    result.merge_seconds = merged.seconds
    return result


def fisher_estimates(job: Job, settings: Merge) -> list[tuple[str, dict]]:
    """Each expert's U-Net Fisher from its own samples of its prompt (``merge.fisher``), cached
    under the data folder by model hash, prompt, sample count and estimator: a model's first
    Fisher merge pays ``fisher_samples`` generations and backward passes, later ones read it.
    Estimated on the model without its LoRAs (they are baked into the merge afterwards)."""
    from composer.checkpoints.hashing import file_sha256, model_file
    from composer.merge import fisher
    from composer.sharing.store import data_dir

    out = []
    for i, src in enumerate(job.sources):
        path = model_file(src)
        model_hash = file_sha256(path) if path is not None else src.location
        prompts = [job.recipe.expert_prompt(i)]
        key = fisher.cache_key(
            model_hash, prompts, settings.fisher_samples, settings.fisher_estimator, 0
        )
        estimate, _ = fisher.cached_unet_fisher(
            job.leases[src.location].pipe,
            model_hash,
            prompts,
            data_dir() / "fisher",
            n=settings.fisher_samples,
            estimator=settings.fisher_estimator,
        )
        out.append((key, estimate))
    return out


def export(recipe, out, dtype: str = "fp16") -> dict:
    from composer.export import export

    return export(recipe, out, dtype)


def parse_numbers(text):
    """ "1, 0.5, 0" → [1.0, 0.5, 0.0]; empty → None; anything else is passed on for the recipe
    parser to refuse with its message."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        return text


def read(values: Values) -> dict:
    experts = [
        {"model": r["model"], "loras": [], "prompt": None, "weight": r["weight"]}
        for r in values["rows"]
    ]
    section = {
        "method": values["method"],
        "base": values["base"] or None,
        "block_weights": parse_numbers(values["block_weights"]),
        **{p.name: values[p.name] for p in PARAMS.values()},
    }
    return {"experts": experts, "merge": section}


def write(recipe) -> Values | None:
    settings = METHOD.settings(recipe)
    if (
        len(recipe.experts) > PAGE_EXPERTS
        or any(e.loras for e in recipe.experts)
        or settings.overrides
    ):
        return None
    blocks = settings.block_weights
    return {
        "method": settings.method,
        "base": settings.base,
        "block_weights": ", ".join(f"{w:g}" for w in blocks) if blocks else "",
        **{p.name: getattr(settings, p.attr) for p in PARAMS.values()},
        "rows": [{"model": e.model, "weight": e.weight} for e in recipe.experts],
    }


def _param_control(p) -> Control:
    if p.choices:
        return Control(p.name, "radio", p.label, p.default, choices=tuple(p.choices), info=p.info)
    if p.page is not None:
        low, high, step = p.page
        return Control(p.name, "slider", p.label, p.default, low=low, high=high, step=step)
    kind = "integer" if p.integer else "number"
    return Control(p.name, kind, p.label, p.default, low=p.low, high=p.high, info=p.info)


def _default_base() -> str | None:
    from composer import registry

    return "toy-base" if "toy-base" in registry.bundled("models") else None


INTRO = (
    "Merge the experts' weights (U-Nets and text encoders; the VAE is the first expert's), then "
    "sample the result as one model. Task-vector methods need the experts' common **base**. The "
    "merge is computed live on the loaded models; **Export** writes it as one fp16 "
    "`.safetensors` file."
)

METHOD = Method(
    name="merge",
    summary="weight merging (task arithmetic, TIES, DARE, Model Stock, …), sampled as one model",
    experts=(2, MAX_EXPERTS),
    run=run,
    section=Merge,
    parse_section=parse_section,
    section_json=section_json,
    check=check,
    models=models,
    extra_seconds=lambda recipe: GPU_SECONDS_PER_MERGED_EXPERT * len(recipe.experts),
    export=export,
    form=Form(
        tab="Merge",
        intro=INTRO,
        read=read,
        write=write,
        controls=(
            Control(
                "method",
                "choice",
                "Method",
                "ties",
                choices=tuple(MERGE_METHODS),
            ),
            Control(
                "base", "model", "Base (common ancestor)", default=_default_base, choices=(None,)
            ),
            *(_param_control(p) for p in PARAMS.values()),
            Control(
                "block_weights",
                "text",
                "Block weights (BASE, IN00…, M00, OUT00…; empty: all 1)",
                "",
                info="26 numbers for SD 1.x/2.x, 20 for SDXL",
            ),
        ),
        advanced=(
            *(p.name for p in PARAMS.values() if p.choices or p.page is None),
            "block_weights",
        ),
        row=(
            Control("model", "model", "Expert"),
            Control("weight", "slider", "Weight", 1.0, low=-2, high=2, step=0.05),
        ),
        rows=PAGE_EXPERTS,
        row_default=lambda k: {"model": default_experts()[k]},
        export=True,
    ),
)
