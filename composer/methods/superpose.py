"""SuperDiff (Skreta et al., ICLR 2025): the experts' scores combined at every step, OR (a
mixture) or AND (equal densities), weighted by an Itô estimate of each expert's log-density
(``pipelines.superposition``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from composer.methods.method import Control, Form, Method, Values
from composer.recipe import MAX_EXPERTS, Fields, RecipeError

if TYPE_CHECKING:
    from composer.methods.sampling import Job, Result

MODES = ("or", "and", "average", "joint", "router")
"""SuperDiff OR and AND, the paper's two baselines: fixed weights (softmax of the bias, equal
without one) and one joint prompt (the experts' prompts joined with " and ", first expert's
model), and a learned router's weights (Decentralized Diffusion Models)."""
PAGE_EXPERTS = 4


@dataclass(frozen=True)
class Superpose:
    mode: str = "or"
    temperature: float | None = None
    """T of the OR softmax; ``None``: the guidance scale (OR of the guided experts)."""
    bias: tuple[float, ...] | None = None
    router: str | None = None
    """``router`` mode: the trained router (bundled name or folder) over these experts."""


def parse_section(obj: Fields, n_experts: int) -> Superpose:
    section = Superpose(
        mode=obj.choice("mode", MODES, default="or"),
        temperature=obj.number("temperature", default=None, low=1e-3, high=100.0, nullable=True),
        bias=obj.numbers("bias", default=None, low=-50.0, high=50.0, length=n_experts),
        router=obj.reference("router", default=None, nullable=True),
    )
    if (section.mode == "router") != (section.router is not None):
        raise RecipeError(
            f"{obj.where}.router: "
            + (
                "null is not accepted for mode 'router'; expected a router trained for these "
                "experts (python -m composer router train), e.g. a bundled one"
                if section.router is None
                else f"{section.router!r} is read only by mode 'router', not {section.mode!r}"
            )
        )
    return section


def section_json(section: Superpose) -> dict:
    out = {**asdict(section), "bias": None if section.bias is None else list(section.bias)}
    if section.router is None:
        del out["router"]  # recipes from before routers are unchanged
    return out


def references(recipe) -> list[tuple[str, str, str]]:
    router = METHOD.settings(recipe).router
    return [] if router is None else [("router", router, "superpose.router")]


def run(job: Job) -> Result:
    """Experts on one model with the same LoRAs share its U-Net and run in one batched call; LoRA
    variants of one model share its U-Net too, with their adapters switched per call. The
    recipe's scheduler is not used: the density estimate needs the pipeline's own
    Euler–Maruyama steps (FIELD_NOTES)."""

    from composer import registry
    from composer.embeddings import apply as apply_embeddings
    from composer.methods.batches import each_batch
    from composer.methods.sampling import expert_adapters, pipe_arguments
    from composer.speedups import Speedups
    from pipelines.superposition import SuperpositionPipeline

    recipe, sources = job.recipe, job.sources
    adapters = expert_adapters(job)
    order = list(dict.fromkeys(src.location for src in sources))
    pipes = [job.leases[loc].pipe for loc in order]
    try:
        pipe = SuperpositionPipeline.from_pipes(pipes)
    except ValueError as e:
        names = {src.location: src.reference for src in sources}
        message = str(e)
        for k, loc in enumerate(order):
            message = message.replace(f"pipes[{k}] ({loc}", f"{names[loc]!r} ({loc}")
        raise RecipeError(f"experts: {message}") from None
    pipe.set_progress_bar_config(disable=True)
    apply_embeddings(pipe, job)
    settings = METHOD.settings(recipe)
    experts = [
        (order.index(src.location), recipe.expert_prompt(i), adapters[i])
        for i, src in enumerate(sources)
    ]

    streams = Speedups.from_env().streams
    router = None
    if settings.router is not None:
        router = registry.load_router(
            registry.resolve_router(settings.router, "superpose.router"), pipe.device
        )
        if router.config.num_experts != len(experts):
            raise RecipeError(
                f"superpose.router: {settings.router!r} routes {router.config.num_experts} "
                f"experts, the recipe has {len(experts)}"
            )

    def batch(seeds: list[int], on_step):
        out = pipe(
            experts=experts,
            mode=settings.mode,
            temperature=settings.temperature,
            bias=list(settings.bias) if settings.bias else None,
            cuda_streams=streams,
            router=router,
            **pipe_arguments(job, pipes[0], seeds, on_step, device=pipe.device),
        )
        traces = [
            [
                {
                    "step": k + 1,
                    "kappa": out.kappa[k, :, b].tolist(),
                    "log_density": out.log_density[k + 1, :, b].tolist(),
                }
                for k in range(out.kappa.shape[0])
            ]
            for b in range(len(seeds))
        ]
        return out.images, traces

    return each_batch(job, str(pipe.device), batch, pipes[0], passes=len(sources))


def default_experts() -> list[str]:
    """The first models of an expert tab: warm and cool toys (OR of them mixes their colours)."""
    from composer import registry

    models = list(registry.bundled("models"))
    preferred = [m for m in ("toy-warm", "toy-cool") if m in models]
    picks = preferred + [m for m in models if m not in preferred] or [""]
    return [picks[k % len(picks)] for k in range(PAGE_EXPERTS)]


def default_router() -> str:
    """The bundled router, if there is one."""
    from composer import registry

    return next(iter(registry.bundled("routers")), "")


def shares_of(bias) -> list[float]:
    """Per-expert "target share" shown for an OR bias: exp(bᵢ − min b), so [0, log 3] → [1, 3]
    (softmax(b) is the mixture OR aims at when the experts are equally likely)."""
    low = min(bias)
    return [round(math.exp(b - low), 6) for b in bias]


def bias_of(shares, exact) -> list[float] | None:
    """The recipe's bias for the shares on the page: ``exact`` (the bias a restored recipe had)
    while the shares still show it, none when all shares are equal, else log(share)."""
    if exact is not None and len(exact) == len(shares) and shares_of(exact) == list(shares):
        return list(exact)
    if len(set(shares)) <= 1:
        return None
    return [math.log(s) if s and s > 0 else float("-inf") for s in shares]  # -inf: parse says no


def read(values: Values) -> dict:
    rows = values["rows"]
    experts = [
        {
            "model": r["model"],
            "loras": [{"path": r["lora"], "weight": r["strength"]}] if r["lora"] else [],
            "prompt": r["prompt"] or None,
            "weight": 1.0,
        }
        for r in rows
    ]
    section = {
        "mode": values["mode"],
        "temperature": None if values["temperature_cfg"] else values["temperature"],
        "bias": bias_of([r["share"] for r in rows], values["exact_bias"]),
    }
    if values["mode"] == "router":
        section["router"] = values["router"] or None
    return {"experts": experts, "superpose": section}


def write(recipe) -> Values | None:
    if len(recipe.experts) > PAGE_EXPERTS or any(len(e.loras) > 1 for e in recipe.experts):
        return None
    settings = METHOD.settings(recipe)
    bias = settings.bias
    shares = shares_of(bias) if bias else [1.0] * len(recipe.experts)
    rows = []
    for k, expert in enumerate(recipe.experts):
        lora = expert.loras[0] if expert.loras else None
        rows.append(
            {
                "model": expert.model,
                "lora": lora.path if lora else None,
                "strength": lora.weight if lora else 1.0,
                "prompt": expert.prompt or "",
                "share": shares[k],
            }
        )
    return {
        "mode": settings.mode,
        "temperature": settings.temperature or 1.0,
        "temperature_cfg": not settings.temperature,
        "exact_bias": list(bias) if bias else None,
        "router": settings.router or default_router(),
        "rows": rows,
    }


def labels(recipe) -> list[str] | None:
    """The joint-prompt baseline samples one prompt: one line, named by that prompt."""
    if METHOD.settings(recipe).mode != "joint":
        return None
    return [
        "joint prompt: " + " and ".join(recipe.expert_prompt(i) for i in range(len(recipe.experts)))
    ]


INTRO = (
    "SuperDiff (Skreta et al., ICLR 2025): every step weighs the experts by their estimated "
    "density of the current image. **OR** draws what either expert would draw; **AND** what "
    "both find equally likely. Experts share a latent space (same VAE); an empty prompt uses the "
    "main prompt."
)


def place(recipe) -> dict[str, str]:
    """Each expert's model on a GPU of its own when one GPU cannot hold them all (issue 22):
    ``{}`` (everything on the default device) with fewer than two CUDA devices or when the
    models fit one; else model → ``cuda:i`` (``composer.serve.placement``), or a
    ``PlacementError`` that says how many devices it would take. Only latents and predictions
    cross devices (``SuperpositionPipeline``). ``COMPOSER_GPU_BUDGET_GB`` sets the share of
    each GPU the models may fill (default: 90 % of the smallest)."""
    import os

    import torch

    devices = torch.cuda.device_count()
    if devices < 2:
        return {}
    from composer.serve.placement import GiB, PlacementError, place_recipe

    budget = int(float(os.environ.get("COMPOSER_GPU_BUDGET_GB") or 0) * GiB) or int(
        0.9 * min(torch.cuda.get_device_properties(i).total_memory for i in range(devices))
    )
    try:
        place_recipe(recipe, budget, 1)
        return {}  # one GPU holds them: no traffic between devices
    except PlacementError:
        return dict(place_recipe(recipe, budget, devices).device)


METHOD = Method(
    name="superpose",
    summary="SuperDiff OR / AND of experts, re-weighted every step",
    experts=(2, MAX_EXPERTS),
    run=run,
    section=Superpose,
    parse_section=parse_section,
    section_json=section_json,
    references=references,
    place=place,
    unet_calls=lambda recipe: len(recipe.experts),
    labels=labels,
    sampler="SuperDiff Euler-Maruyama",
    form=Form(
        tab="Superpose",
        intro=INTRO,
        read=read,
        write=write,
        controls=(
            Control(
                "mode",
                "radio",
                "Mode",
                "or",
                choices=(
                    ("OR: either expert (mixture)", "or"),
                    ("AND: both at once (equal densities)", "and"),
                    ("Average: fixed weights (baseline)", "average"),
                    ("Joint prompt (baseline)", "joint"),
                    ("Router: a trained router's weights", "router"),
                ),
            ),
            Control(
                "router",
                "text",
                "Router (mode Router)",
                default_router,
                info="a bundled router or a folder (python -m composer router train)",
            ),
            Control(
                "temperature_cfg",
                "check",
                "OR temperature = CFG scale",
                True,
                info="the mixture of what each expert draws at this CFG; untick to set T "
                "(the paper's T = 1 is for CFG 1)",
                enables="temperature",
            ),
            Control("temperature", "slider", "Temperature (OR)", 1.0, low=0.1, high=20, step=0.05),
            Control("exact_bias", "state"),
        ),
        row=(
            Control("model", "model", "Expert"),
            Control("lora", "lora", "LoRA"),
            Control("strength", "slider", "Strength", 1.0, low=-2, high=2, step=0.05),
            Control("prompt", "text", "Prompt (empty: main prompt)", ""),
            Control(
                "share",
                "number",
                "Target share",
                1.0,
                low=0.001,
                info="relative: 1 and 3 aim at 1:3 (OR)",
            ),
        ),
        rows=PAGE_EXPERTS,
        row_default=lambda k: {"model": default_experts()[k]},
    ),
)
