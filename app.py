"""Diffusion Composer's page: layout and event wiring only. ``python app.py`` serves it.

Every action goes through a recipe: the controls are turned into recipe JSON, parsed by
``composer.recipe.parse`` (the one validation), run by ``composer.engine``; a dropped PNG, a
pasted recipe or a shared link (``?id=`` from ``composer.sharing.store``, ``?recipe=`` from
``composer.sharing.links``) is parsed the same way and written back into the controls.

On a Hugging Face Space with ZeroGPU the sampling runs inside ``spaces.GPU``; elsewhere, or
without the ``spaces`` package, the same function runs as it is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import threading
import uuid
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import gradio as gr

try:
    import spaces  # on ZeroGPU this must come before anything initialises CUDA
except ImportError:
    spaces = None

from gradio import route_utils

from composer import engine, registry
from composer.recipe import (
    A1111_SAMPLERS,
    MAX_IMAGES,
    MAX_STEPS,
    MERGE_METHODS,
    Merge,
    Recipe,
    RecipeError,
    parse,
)
from composer.sharing.links import decode_recipe, recipe_link, share_link
from composer.sharing.pnginfo import png_bytes, read_recipe
from composer.sharing.store import Store

log = logging.getLogger("composer.app")
LORA_SLOTS = 3
PAGE_EXPERTS = 4
"""Expert rows on the Superpose tab; recipes with more experts run from the Recipe panel."""
SUPERPOSE_MODES = [
    ("OR: either expert (mixture)", "or"),
    ("AND: both at once (equal densities)", "and"),
    ("Average: fixed weights (baseline)", "average"),
    ("Joint prompt (baseline)", "joint"),
]
OUTPUT_DIR = Path(tempfile.gettempdir()) / "composer-outputs"
SAMPLER_CHOICES = [(name, key) for name, key in A1111_SAMPLERS.items() if key != "ddpm"]
_CANCEL: dict[str, threading.Event] = {}


def default_model() -> str:
    models = registry.bundled("models")
    return registry.DEFAULT_MODEL if registry.DEFAULT_MODEL in models else next(iter(models), "")


def default_aggregator() -> str:
    """The Aggregate tab's first aggregator: the bundled one, else none (uniform averaging)."""
    return next(iter(registry.bundled("aggregators")), "")


def aggregator_experts(reference: str) -> list[str]:
    """The experts an aggregator was trained for, in order (``[]`` for none or unknown)."""
    if not reference:
        return []
    try:
        config = Path(registry.resolve_aggregator(reference)) / "config.json"
        return list(json.loads(config.read_text()).get("expert_names", []))
    except (RecipeError, OSError, ValueError):
        return []


def default_experts() -> list[str]:
    """The Superpose tab's first models: warm and cool toys (OR of them mixes their colours)."""
    models = list(registry.bundled("models"))
    preferred = [m for m in ("toy-warm", "toy-cool") if m in models]
    rest = [m for m in models if m not in preferred]
    picks = preferred + rest or [""]
    return [picks[k % len(picks)] for k in range(PAGE_EXPERTS)]


# --- controls ⇄ recipe --------------------------------------------------------------------------
#
# The page's controls, in one fixed order: ``control_names()`` names them, ``recipe_dict`` reads
# their values by name and ``control_values`` writes them back, so the two stay inverse.

ROW_FIELDS = ("model", "lora", "strength", "prompt", "share")
MERGE_FIELDS = (
    "merge.method",
    "merge.base",
    "merge.density",
    "merge.lambda",
    "merge.seed",
    "merge.sign_rule",
    "merge.trim_scope",
    "merge.consensus_of",
    "merge.block_weights",
)
SAMPLER_FIELDS = (
    "prompt",
    "negative",
    "scheduler",
    "steps",
    "cfg",
    "seed",
    "width",
    "height",
    "count",
)


def control_names() -> list[str]:
    return [
        "method",
        "model",
        *(f"lora{j}.{f}" for j in range(LORA_SLOTS) for f in ("path", "weight")),
        "mode",
        "temperature",
        "temperature_cfg",
        "shown",
        *(f"expert{k}.{f}" for k in range(PAGE_EXPERTS) for f in ROW_FIELDS),
        "exact_bias",
        *MERGE_FIELDS,
        "merge_shown",
        *(f"merge{k}.{f}" for k in range(PAGE_EXPERTS) for f in ("model", "weight")),
        "aggregate.aggregator",
        "aggregate_shown",
        *(f"aggregate{k}.model" for k in range(PAGE_EXPERTS)),
        *(f"aggregate{k}.prompt" for k in range(PAGE_EXPERTS)),
        *SAMPLER_FIELDS,
    ]


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


def recipe_dict(*values) -> dict:
    """The controls' values (in ``control_names()`` order) → recipe JSON."""
    c = dict(zip(control_names(), values, strict=True))
    method = c["method"]
    recipe = {
        "version": 1,
        "prompt": c["prompt"],
        "negative_prompt": c["negative"],
        "method": method,
        "sampler": {
            "scheduler": c["scheduler"],
            "steps": c["steps"],
            "guidance_scale": c["cfg"],
            "seed": c["seed"],
            "width": c["width"] or None,
            "height": c["height"] or None,
            "num_images": c["count"],
        },
    }
    if method == "merge":
        rows = range(int(c["merge_shown"]))
        recipe["experts"] = [
            {
                "model": c[f"merge{k}.model"],
                "loras": [],
                "prompt": None,
                "weight": c[f"merge{k}.weight"],
            }
            for k in rows
        ]
        recipe["merge"] = {
            "method": c["merge.method"],
            "base": c["merge.base"] or None,
            "density": c["merge.density"],
            "lambda": c["merge.lambda"],
            "seed": c["merge.seed"],
            "block_weights": parse_numbers(c["merge.block_weights"]),
            "sign_rule": c["merge.sign_rule"],
            "trim_scope": c["merge.trim_scope"],
            "consensus_of": c["merge.consensus_of"],
        }
    elif method == "aggregate":
        recipe["experts"] = [
            {
                "model": c[f"aggregate{k}.model"],
                "loras": [],
                "prompt": c[f"aggregate{k}.prompt"] or None,
                "weight": 1.0,
            }
            for k in range(int(c["aggregate_shown"]))
        ]
        recipe["aggregate"] = {"aggregator": c["aggregate.aggregator"] or None}
    elif method == "superpose":
        rows = range(int(c["shown"]))
        recipe["experts"] = [
            {
                "model": c[f"expert{k}.model"],
                "loras": [{"path": c[f"expert{k}.lora"], "weight": c[f"expert{k}.strength"]}]
                if c[f"expert{k}.lora"]
                else [],
                "prompt": c[f"expert{k}.prompt"] or None,
                "weight": 1.0,
            }
            for k in rows
        ]
        shares = [c[f"expert{k}.share"] for k in rows]
        recipe["superpose"] = {
            "mode": c["mode"],
            "temperature": None if c["temperature_cfg"] else c["temperature"],
            "bias": bias_of(shares, c["exact_bias"]),
        }
    else:
        loras = [
            {"path": c[f"lora{j}.path"], "weight": c[f"lora{j}.weight"]}
            for j in range(LORA_SLOTS)
            if c[f"lora{j}.path"]
        ]
        recipe["experts"] = [{"model": c["model"], "loras": loras, "prompt": None, "weight": 1.0}]
    return recipe


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


def fits_page(recipe) -> bool:
    """Whether the controls can show ``recipe`` exactly."""
    if recipe.method == "merge":
        settings = recipe.merge or Merge()
        return (
            len(recipe.experts) <= PAGE_EXPERTS
            and not any(e.loras for e in recipe.experts)
            and not settings.overrides
            and (settings.consensus_k, settings.mask_lambda) == (2, 0.4)
        )
    if recipe.method == "single":
        return len(recipe.experts[0].loras) <= LORA_SLOTS
    if recipe.method == "aggregate":
        return len(recipe.experts) <= PAGE_EXPERTS and not any(
            e.loras or e.weight != 1.0 for e in recipe.experts
        )
    if recipe.method == "superpose":
        return len(recipe.experts) <= PAGE_EXPERTS and all(
            len(e.loras) <= 1 for e in recipe.experts
        )
    return False


def control_values(recipe, current: dict | None = None) -> list:
    """A parsed recipe that ``fits_page`` → the controls' values (in ``control_names()`` order).
    Controls the recipe does not use keep ``current`` (name → value) or their defaults."""
    c = dict.fromkeys(control_names())
    c.update(
        model=default_model(),
        mode="or",
        temperature=1.0,
        temperature_cfg=True,
        shown=2,
        exact_bias=None,
    )
    for j in range(LORA_SLOTS):
        c[f"lora{j}.weight"] = 1.0
    for k, model in enumerate(default_experts()):
        c.update(
            {
                f"expert{k}.model": model,
                f"expert{k}.strength": 1.0,
                f"expert{k}.prompt": "",
                f"expert{k}.share": 1.0,
            }
        )
    c.update(
        {
            "merge.method": "ties",
            "merge.base": "toy-base" if "toy-base" in registry.bundled("models") else None,
            "merge.density": 0.2,
            "merge.lambda": 1.0,
            "merge.seed": 0,
            "merge.sign_rule": "mass",
            "merge.trim_scope": "tensor",
            "merge.consensus_of": "task_arithmetic",
            "merge.block_weights": "",
            "merge_shown": 2,
        }
    )
    for k, model in enumerate(default_experts()):
        c.update({f"merge{k}.model": model, f"merge{k}.weight": 1.0})
    c.update({"aggregate.aggregator": default_aggregator(), "aggregate_shown": 2})
    for k, model in enumerate(default_experts()):
        c[f"aggregate{k}.model"] = model
    c.update({f"aggregate{k}.prompt": "" for k in range(PAGE_EXPERTS)})
    c.update(current or {})
    s = recipe.sampler
    c.update(
        method=recipe.method,
        prompt=recipe.prompt,
        negative=recipe.negative_prompt,
        scheduler=s.scheduler,
        steps=s.steps,
        cfg=s.guidance_scale,
        seed=s.seed,
        width=s.width or 0,
        height=s.height or 0,
        count=s.num_images,
    )
    if recipe.method == "merge":
        settings = recipe.merge or Merge()
        c.update(
            {
                "merge.method": settings.method,
                "merge.base": settings.base,
                "merge.density": settings.density,
                "merge.lambda": settings.lambda_,
                "merge.seed": settings.seed,
                "merge.sign_rule": settings.sign_rule,
                "merge.trim_scope": settings.trim_scope,
                "merge.consensus_of": settings.consensus_of,
                "merge.block_weights": ", ".join(f"{w:g}" for w in settings.block_weights)
                if settings.block_weights
                else "",
                "merge_shown": len(recipe.experts),
            }
        )
        for k, expert in enumerate(recipe.experts):
            c.update({f"merge{k}.model": expert.model, f"merge{k}.weight": expert.weight})
    elif recipe.method == "aggregate":
        settings = recipe.aggregate
        c["aggregate.aggregator"] = settings.aggregator if settings and settings.aggregator else ""
        c["aggregate_shown"] = len(recipe.experts)
        for k, expert in enumerate(recipe.experts):
            c[f"aggregate{k}.model"] = expert.model
            c[f"aggregate{k}.prompt"] = expert.prompt or ""
    elif recipe.method == "superpose":
        settings = recipe.superpose
        bias = settings.bias if settings and settings.bias else None
        shares = shares_of(bias) if bias else [1.0] * len(recipe.experts)
        c.update(
            mode=settings.mode if settings else "or",
            temperature=settings.temperature if settings and settings.temperature else 1.0,
            temperature_cfg=not (settings and settings.temperature),
            shown=len(recipe.experts),
            exact_bias=list(bias) if bias else None,
        )
        for k, expert in enumerate(recipe.experts):
            lora = expert.loras[0] if expert.loras else None
            c.update(
                {
                    f"expert{k}.model": expert.model,
                    f"expert{k}.lora": lora.path if lora else None,
                    f"expert{k}.strength": lora.weight if lora else 1.0,
                    f"expert{k}.prompt": expert.prompt or "",
                    f"expert{k}.share": shares[k],
                }
            )
    else:
        expert = recipe.experts[0]
        c["model"] = expert.model
        for j in range(LORA_SLOTS):
            lo = expert.loras[j] if j < len(expert.loras) else None
            c[f"lora{j}.path"] = lo.path if lo else None
            c[f"lora{j}.weight"] = lo.weight if lo else 1.0
    return [c[name] for name in control_names()]


def kappa_frame(labels: list[str], steps: list[dict]):
    """One image's κ per step as a long table for ``gr.LinePlot`` (step, κ, expert)."""
    import pandas as pd

    rows = [
        {"step": step["step"], "kappa": float(kappa), "expert": labels[min(k, len(labels) - 1)]}
        for step in steps
        for k, kappa in enumerate(step.get("kappa", []))
    ]
    return pd.DataFrame(rows, columns=["step", "kappa", "expert"])


def expert_labels(recipe) -> list[str]:
    if recipe.method == "superpose" and recipe.superpose and recipe.superpose.mode == "joint":
        return [
            "joint prompt: "
            + " and ".join(recipe.expert_prompt(i) for i in range(len(recipe.experts)))
        ]
    return [
        f"{i + 1}: {e.model}"
        + "".join(f" + {lo.path}" for lo in e.loras)
        + f" · {recipe.expert_prompt(i)!r}"
        for i, e in enumerate(recipe.experts)
    ]


# --- GPU ----------------------------------------------------------------------------------------

GPU_SECONDS_BASE = 20
"""Loading a checkpoint the worker has not cached yet, decoding latents, returning the images."""
GPU_SECONDS_PER_CALL = 0.1
"""One U-Net step with classifier-free guidance on 512×512 pixels, with a margin: SD 1.5 in fp16
takes a few hundredths of a second on an H100-class GPU, and a ZeroGPU slice is part of one."""
GPU_SECONDS_PER_MERGED_EXPERT = 10
"""Reading one expert's U-Net into a live merge (TIES' thresholds included)."""
GPU_SECONDS_MAX = 300
"""ZeroGPU refuses a larger ask outright ("illegal duration"); its maintainers give 5 minutes as
the most a signed-in visitor may ask for, and the estimates above carry margin."""


def gpu_seconds(recipe: Recipe, *_) -> int:
    """How long a ZeroGPU call for ``recipe`` asks to hold the GPU. ZeroGPU stops a call that
    overruns its ask, refuses an ask larger than the visitor's remaining quota and queues longer
    asks behind shorter ones, so the ask follows the work: U-Net calls (steps × experts × images)
    scaled by the pixel count (SDXL's 1024² where the recipe leaves the size to the model), plus
    loading, plus the live merge for ``merge``, up to ``GPU_SECONDS_MAX``."""
    s = recipe.sampler
    experts = len(recipe.experts) if recipe.method in ("superpose", "aggregate") else 1
    pixels = (s.width or 1024) * (s.height or 1024) / 512**2
    seconds = GPU_SECONDS_BASE + GPU_SECONDS_PER_CALL * s.steps * experts * s.num_images * pixels
    if recipe.method == "merge":
        seconds += GPU_SECONDS_PER_MERGED_EXPERT * len(recipe.experts)
    return min(math.ceil(seconds), GPU_SECONDS_MAX)


def on_gpu(fn):
    """``spaces.GPU`` with a duration from ``gpu_seconds`` where the ``spaces`` package is
    installed. It changes nothing unless the Space runs on ZeroGPU (``SPACES_ZERO_GPU``), so the
    same code runs locally, in CI, on a Space with its own GPU or on CPU."""
    return fn if spaces is None else spaces.GPU(fn, duration=gpu_seconds)


@on_gpu
def sample(recipe: Recipe, progress: gr.Progress, cancel_key: str) -> engine.Result:
    """The GPU part of a generation. On ZeroGPU it runs in a forked worker: its arguments and
    result are pickled, so it takes the key of the Stop button's event rather than the event (a
    worker cannot see it, and Stop ends a ZeroGPU call only once it returns), and only
    ``gr.Error`` crosses back with its message, so every failure becomes one here."""

    def report(done: int, total: int) -> None:
        progress((done, total), desc="Sampling", unit="steps")

    try:
        return engine.generate(recipe, cancel=_CANCEL.get(cancel_key), progress=report)
    except engine.Cancelled:
        raise
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    except Exception as e:  # keep the server up for the next user; the log has the traceback
        log.exception("generation failed")
        raise gr.Error(f"Generation failed: {e.__class__.__name__}: {e}") from None


def preload() -> None:
    """Load the bundled models before the server starts. On ZeroGPU ``spaces`` makes CUDA look
    present in this process, so the cache moves them to "cuda" here, which ZeroGPU packs once and
    hands to every GPU worker it forks; a model first loaded inside a GPU call is loaded again by
    each new worker, on that call's time."""
    for name in registry.bundled("models"):
        with registry.CACHE.lease(registry.resolve_model(name)):
            pass


# --- handlers -----------------------------------------------------------------------------------


def run_recipe(recipe_json: str, progress=gr.Progress(), request: gr.Request = None):
    """Generate from recipe JSON: the page's Generate button and the ``generate`` API endpoint.
    Returns the gallery, the recipe as run, a status line, the per-image κ traces (page state),
    the κ plot of the first image (superposition only) and what Share stores (session state)."""
    try:
        recipe = parse(recipe_json, check=registry.check_reference)
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    key = request.session_hash if request is not None else uuid.uuid4().hex
    _CANCEL[key] = threading.Event()
    try:
        result = sample(recipe, progress, key)
    except engine.Cancelled as e:
        gr.Info(f"Stopped; {len(e.images)} image(s) were finished.")
        return [], recipe.to_json(), "Stopped.", None, gr.update(visible=False), None
    finally:
        _CANCEL.pop(key, None)
    paths = write_pngs(
        [png_bytes(image, info) for image, info in zip(result.images, result.metadata, strict=True)]
    )
    status = (
        f"{len(result.images)} image(s), {sum(result.seconds):.2f} s on {result.device} "
        f"({sum(result.seconds) / max(len(result.images), 1):.2f} s per image)"
    )
    kappas = None
    plot = gr.update(visible=False, value=None)
    if recipe.method == "superpose" and result.trace:
        kappas = {"labels": expert_labels(recipe), "traces": result.trace, "seeds": result.seeds}
        plot = kappa_plot(kappas, 0)
    if recipe.method == "aggregate" and result.maps:
        kappas = {"labels": expert_labels(recipe), "maps": result.maps, "paths": paths,
                  "seeds": result.seeds}  # fmt: skip
    last = {"recipe": recipe.to_json(indent=None), "paths": paths}
    return gallery_items(paths, recipe), recipe.to_json(), status, kappas, plot, last


def write_pngs(pngs: list[bytes]) -> list[str]:
    """PNG files in a fresh folder under ``OUTPUT_DIR``, the one place the page serves files from
    (the share store's own folder is never served)."""
    folder = OUTPUT_DIR / uuid.uuid4().hex
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, png in enumerate(pngs):
        path = folder / f"{i:05d}.png"
        path.write_bytes(png)
        paths.append(str(path))
    return paths


def gallery_items(paths: list[str], recipe: Recipe) -> list[tuple[str, str]]:
    return [(path, f"seed {recipe.sampler.seed + i}") for i, path in enumerate(paths)]


def page_url(request: gr.Request | None) -> str:
    """Where links point. On a Space: its page on huggingface.co, which passes ``?id=`` and
    ``?recipe=`` on to the app when it loads (the app's own address is an iframe's). Elsewhere:
    the address this request reached the server at, proxy headers resolved as Gradio does."""
    space = os.environ.get("SPACE_ID")
    if space:
        return f"https://huggingface.co/spaces/{space}"
    raw = getattr(request, "request", None)
    if raw is None:
        return ""
    try:
        route = route_utils.get_api_call_path(raw)
    except ValueError:  # an event outside the queue
        route = ""
    return route_utils.get_root_url(raw, route, None)


def share(last: dict | None, listed: bool = False, request: gr.Request = None):
    """The Share button and the ``share`` API endpoint: store this session's last generation
    (the recipe it ran and the PNGs this server wrote, never files a client sends) and return its
    ``?id=`` link and the stateless ``?recipe=`` link ("" when the recipe is too long for one)."""
    if not last:
        raise gr.Error("Nothing to share yet: generate first, then press Share.")
    base = page_url(request)
    try:
        pngs = [Path(path).read_bytes() for path in last["paths"]]
    except OSError:
        raise gr.Error(
            "The images of the last generation are no longer on the server; generate again."
        ) from None
    try:
        share_id = Store().save(last["recipe"], pngs, listed=bool(listed))
        recipe = parse(last["recipe"])
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    try:
        stateless = recipe_link(base, recipe)
    except RecipeError as e:
        gr.Info(str(e))
        stateless = ""
    return share_link(base, share_id), stateless


def open_link(request: gr.Request):
    """Page load: ``?id=`` shows a stored generation, ``?recipe=`` sets the controls from a
    stateless link. Returns updates for ``[*restored, gallery, status, last, rerun_recipe,
    rerun]``; a link that cannot be opened says why in the status line."""
    query = dict(request.query_params) if request is not None else {}
    if "id" in query:
        return open_entry(query["id"])
    if "recipe" not in query:
        return [*[gr.update()] * (RESTORED + 2), None, None, gr.update(visible=False)]
    try:
        recipe = decode_recipe(query["recipe"])
    except RecipeError as e:
        return cannot_open(e)
    status = "Controls set from the link's recipe; **Re-run** makes its images."
    return [*restore(recipe), gr.update(), status, None, recipe.to_json(), gr.update(visible=True)]


def open_entry(share_id: str) -> list:
    """A stored generation on the page: its recipe in the controls, its images as they were
    made (not made again) and Re-run, which makes them again from the recipe."""
    try:
        entry = Store().open(share_id)
    except RecipeError as e:
        return cannot_open(e)
    paths = write_pngs(list(entry.pngs))
    last = {"recipe": entry.recipe.to_json(indent=None), "paths": paths}
    status = (
        f"Shared generation `{entry.id}`: {len(paths)} image(s) as they were made. "
        "**Re-run** makes them again from the recipe."
    )
    return [
        *restore(entry.recipe),
        gallery_items(paths, entry.recipe),
        status,
        last,
        entry.recipe.to_json(),
        gr.update(visible=True),
    ]


def cannot_open(error: RecipeError) -> list:
    return [
        *[gr.update()] * (RESTORED + 1),
        f"This link cannot be opened: {error}",
        None,
        None,
        gr.update(visible=False),
    ]


def list_shared():
    """The Shared panel: the first image of each of the latest generations shared with "list
    it"; an entry that no longer opens is left out."""
    shares = Store()
    items, ids = [], []
    for share_id in shares.latest():
        try:
            entry = shares.open(share_id)
        except RecipeError:
            continue
        (path,) = write_pngs([entry.pngs[0]])
        items.append((path, f"{entry.recipe.method}: {entry.recipe.prompt[:60]}"))
        ids.append(share_id)
    return items, ids


def open_shared(ids: list[str], evt: gr.SelectData):
    return open_entry(ids[evt.index])


def kappa_plot(kappas: dict | None, index: int):
    if not kappas or "traces" not in kappas or not 0 <= index < len(kappas["traces"]):
        return gr.update(visible=False, value=None)
    return gr.update(
        visible=True,
        value=kappa_frame(kappas["labels"], kappas["traces"][index]),
        label=f"κ per step, image {index + 1} (seed {kappas['seeds'][index]}); click an image",
    )


def select_image(kappas: dict | None, evt: gr.SelectData):
    index = evt.index if isinstance(evt.index, int) else 0
    return kappa_plot(kappas, index), maps_picture(kappas, index)


MAP_POINTS = 4
"""Aggregation points pictured beside an image: the first block, the mid block, the last up
block and the output head (from fine to coarse to fine)."""


def maps_picture(kappas: dict | None, index: int = 0):
    """An AFA image beside the maps of where each expert was trusted (expert 1 red, 2 blue,
    3 green, 4 yellow; averaged over the steps); hidden for other methods."""
    from PIL import Image

    from ui.maps import expert_share, side_by_side

    if not kappas or "maps" not in kappas or not 0 <= index < len(kappas["maps"]):
        return gr.update(visible=False, value=None)
    maps = kappas["maps"][index]
    names = list(maps)
    shown = [names[1], "mid", names[-2], names[-1]] if len(names) >= MAP_POINTS else names
    with Image.open(kappas["paths"][index]) as image:
        scale = max(1, 256 // max(image.size))
        big = image.convert("RGB").resize(
            (image.width * scale, image.height * scale), Image.Resampling.NEAREST
        )
    shares = ", ".join(
        f"{label.split(' ·')[0]} {share:.0%}"
        for label, share in zip(kappas["labels"], expert_share(maps["mid"]), strict=False)
    )
    return gr.update(
        visible=True,
        value=side_by_side(big, maps, shown),
        label=f"Image {index + 1} and where each expert was trusted at {', '.join(shown)} "
        f"(red: expert 1, blue: 2, green: 3, yellow: 4); mid block: {shares}",
    )


def run_controls(*values, progress=gr.Progress(), request: gr.Request = None):
    return run_recipe(json.dumps(recipe_dict(*values)), progress, request)


def stop(request: gr.Request):
    event = _CANCEL.get(request.session_hash)
    if event is not None:
        event.set()


def restore(recipe, current: list | None = None) -> list:
    """Updates for ``[*CONTROLS, recipe_box, tabs, *expert rows of Superpose, Merge and
    Aggregate]`` showing ``recipe``. A recipe
    the controls cannot show (another method, more experts or LoRAs than the page has rows for)
    goes to the Recipe panel only, from where it can be run as it is."""
    if not fits_page(recipe):
        gr.Info(
            f"This recipe (method {recipe.method!r}, {len(recipe.experts)} expert(s)) is more "
            "than the controls show: it is in the Recipe panel, from where “Generate from this "
            "recipe” runs it."
        )
        return (
            [gr.update()] * len(CONTROLS)
            + [recipe.to_json(), gr.update()]
            + [gr.update()] * (3 * PAGE_EXPERTS)
        )
    names = control_names()
    values = control_values(recipe, dict(zip(names, current, strict=True)) if current else None)
    shown = values[names.index("shown")]
    merge_shown = values[names.index("merge_shown")]
    aggregate_shown = values[names.index("aggregate_shown")]
    return [
        *values,
        recipe.to_json(),
        gr.update(selected=recipe.method),
        *(gr.update(visible=k < shown) for k in range(PAGE_EXPERTS)),
        *(gr.update(visible=k < merge_shown) for k in range(PAGE_EXPERTS)),
        *(gr.update(visible=k < aggregate_shown) for k in range(PAGE_EXPERTS)),
    ]


def restore_from_recipe(recipe_json: str, *current):
    try:
        recipe = parse(recipe_json)
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    return restore(recipe, list(current) or None)


def restore_from_png(image, *current):
    if image is None:
        return [gr.update()] * RESTORED
    try:
        recipe = read_recipe(image)
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    if fits_page(recipe):
        gr.Info("Controls restored from the image's recipe.")
    return restore(recipe, list(current) or None)


def export_merge(*values, progress=gr.Progress()):
    """The Merge tab's Export button: the merge as one fp16 ``.safetensors`` file to download."""
    from composer.merge.export import export

    try:
        recipe = parse(json.dumps(recipe_dict(*values)), check=registry.check_reference)
        if recipe.method != "merge":
            raise RecipeError("method: export needs the Merge tab's recipe (method 'merge')")
        folder = OUTPUT_DIR / uuid.uuid4().hex
        folder.mkdir(parents=True, exist_ok=True)
        progress(0, desc="Merging and writing")
        done = export(recipe, folder / "merged.safetensors", "fp16")
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    except Exception as e:
        log.exception("export failed")
        raise gr.Error(f"Export failed: {e.__class__.__name__}: {e}") from None
    gr.Info(f"Merged in {done['seconds']:.1f} s ({done['bytes'] / 2**20:.1f} MiB, fp16).")
    return done["path"]


def current_recipe(*values) -> str:
    return json.dumps(recipe_dict(*values), indent=2)


def change_rows(shown: int, delta: int):
    shown = max(2, min(PAGE_EXPERTS, int(shown) + delta))
    return [shown, *(gr.update(visible=k < shown) for k in range(PAGE_EXPERTS))]


# --- layout -------------------------------------------------------------------------------------


def choose_aggregator(reference: str, shown: int):
    """Picking an aggregator puts the experts it was trained for into the rows, in order."""
    experts = aggregator_experts(reference)
    if not 2 <= len(experts) <= PAGE_EXPERTS:
        return [shown, *[gr.update()] * (2 * PAGE_EXPERTS)]
    return [
        len(experts),
        *(gr.update(visible=k < len(experts)) for k in range(PAGE_EXPERTS)),
        *(gr.update(value=experts[k]) if k < len(experts) else gr.update()
          for k in range(PAGE_EXPERTS)),
    ]  # fmt: skip


def expert_dropdown(models: list[str], value: str, k: int) -> gr.Dropdown:
    """Expert k's model picker on the Superpose, Merge and Aggregate tabs."""
    return gr.Dropdown(
        models, value=value, allow_custom_value=True, label=f"Expert {k + 1}", scale=3
    )


CONTROLS: list = []
RESTORED = len(control_names()) + 2 + 3 * PAGE_EXPERTS
"""How many outputs ``restore`` updates: the controls, the recipe box, the tabs, the rows."""


def build() -> gr.Blocks:
    models = list(registry.bundled("models"))
    loras = list(registry.bundled("loras"))
    model_info = "A bundled model, a local diffusers folder or .safetensors file, or a Hub id"
    with gr.Blocks(title="Diffusion Composer") as demo:
        gr.Markdown(
            "# Diffusion Composer\nCombine Stable Diffusion checkpoints and LoRAs in one "
            "generation. Every image carries its recipe: drop it back here to restore it."
        )
        method = gr.State("single")
        shown = gr.State(2)
        merge_shown = gr.State(2)
        aggregate_shown = gr.State(2)
        exact_bias = gr.State(None)
        kappas = gr.State(None)
        last = gr.State(None)
        rerun_recipe = gr.State(None)
        with gr.Row():
            with gr.Column(scale=5):
                with gr.Tabs(selected="single") as tabs:
                    with gr.Tab("Single model", id="single") as tab_single:
                        model = gr.Dropdown(
                            models,
                            value=default_model(),
                            allow_custom_value=True,
                            label="Model",
                            info=model_info,
                        )
                        lora_controls = []
                        with gr.Accordion("LoRAs", open=False):
                            for j in range(LORA_SLOTS):
                                with gr.Row():
                                    lora_controls.append(
                                        gr.Dropdown(
                                            [None, *loras],
                                            value=None,
                                            allow_custom_value=True,
                                            label=f"LoRA {j + 1}",
                                            scale=3,
                                        )
                                    )
                                    lora_controls.append(
                                        gr.Slider(
                                            -2, 2, value=1.0, step=0.05, label="Strength", scale=2
                                        )
                                    )
                    with gr.Tab("Superpose", id="superpose") as tab_superpose:
                        gr.Markdown(
                            "SuperDiff (Skreta et al., ICLR 2025): every step weighs the experts "
                            "by their estimated density of the current image. **OR** draws what "
                            "either expert would draw; **AND** what both find equally likely. "
                            "Experts share a latent space (same VAE); an empty prompt uses the "
                            "main prompt."
                        )
                        with gr.Row():
                            mode = gr.Radio(SUPERPOSE_MODES, value="or", label="Mode", scale=3)
                            with gr.Column(scale=3):
                                temperature_cfg = gr.Checkbox(
                                    True,
                                    label="OR temperature = CFG scale",
                                    info="the mixture of what each expert draws at this CFG; "
                                    "untick to set T (the paper's T = 1 is for CFG 1)",
                                )
                                temperature = gr.Slider(
                                    0.1,
                                    20,
                                    value=1.0,
                                    step=0.05,
                                    label="Temperature (OR)",
                                    interactive=False,
                                )
                        rows, row_controls = [], []
                        starts = default_experts()
                        for k in range(PAGE_EXPERTS):
                            with gr.Group(visible=k < 2) as row:
                                with gr.Row():
                                    row_controls += [
                                        expert_dropdown(models, starts[k], k),
                                        gr.Dropdown(
                                            [None, *loras],
                                            value=None,
                                            allow_custom_value=True,
                                            label="LoRA",
                                            scale=2,
                                        ),
                                        gr.Slider(
                                            -2, 2, value=1.0, step=0.05, label="Strength", scale=2
                                        ),
                                    ]
                                with gr.Row():
                                    row_controls += [
                                        gr.Textbox(
                                            "", label="Prompt (empty: main prompt)", scale=4
                                        ),
                                        gr.Number(
                                            1.0,
                                            label="Target share",
                                            info="relative: 1 and 3 aim at 1:3 (OR)",
                                            minimum=0.001,
                                            scale=1,
                                        ),
                                    ]
                            rows.append(row)
                        with gr.Row():
                            add = gr.Button("Add expert", size="sm")
                            remove = gr.Button("Remove expert", size="sm")
                    with gr.Tab("Merge", id="merge") as tab_merge:
                        gr.Markdown(
                            "Merge the experts' weights (U-Nets and text encoders; the VAE is "
                            "the first expert's), then sample the result as one model. "
                            "Task-vector methods need the experts' common **base**. The merge "
                            "is computed live on the loaded models; **Export** writes it as "
                            "one fp16 `.safetensors` file."
                        )
                        with gr.Row():
                            merge_method = gr.Dropdown(
                                list(MERGE_METHODS), value="ties", label="Method", scale=2
                            )
                            merge_base = gr.Dropdown(
                                [None, *models],
                                value="toy-base" if "toy-base" in models else None,
                                allow_custom_value=True,
                                label="Base (common ancestor)",
                                scale=2,
                            )
                        merge_rows, merge_controls = [], []
                        for k in range(PAGE_EXPERTS):
                            with gr.Row(visible=k < 2) as row:
                                merge_controls += [
                                    expert_dropdown(models, starts[k], k),
                                    gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight", scale=2),
                                ]
                            merge_rows.append(row)
                        with gr.Row():
                            merge_add = gr.Button("Add expert", size="sm")
                            merge_remove = gr.Button("Remove expert", size="sm")
                        with gr.Row():
                            density = gr.Slider(
                                0, 1, value=0.2, step=0.01, label="Density (kept fraction)"
                            )
                            lam = gr.Slider(-2, 3, value=1.0, step=0.05, label="λ (task scale)")
                            merge_seed = gr.Number(0, label="Mask seed (DARE)", precision=0)
                        with gr.Accordion("TIES options and block weights", open=False):
                            with gr.Row():
                                sign_rule = gr.Radio(
                                    [("mass (paper)", "mass"), ("count", "count")],
                                    value="mass",
                                    label="Sign election",
                                )
                                trim_scope = gr.Radio(
                                    [("per tensor", "tensor"), ("whole model (paper)", "model")],
                                    value="tensor",
                                    label="Trim scope",
                                )
                                consensus_of = gr.Radio(
                                    [("task arithmetic", "task_arithmetic"), ("TIES", "ties")],
                                    value="task_arithmetic",
                                    label="Consensus over",
                                )
                            block_weights = gr.Textbox(
                                "",
                                label="Block weights (BASE, IN00…, M00, OUT00…; empty: all 1)",
                                placeholder="26 numbers for SD 1.x/2.x, 20 for SDXL",
                            )
                        with gr.Row():
                            export_button = gr.Button("Export .safetensors", size="sm")
                            exported = gr.File(label="Merged checkpoint", height=60)
                    with gr.Tab("Aggregate", id="aggregate") as tab_aggregate:
                        gr.Markdown(
                            "AFA (Wang et al., ICLR 2025): the experts' U-Nets run side by side "
                            "and, after every block, a trained **aggregator** decides per pixel "
                            "which expert's features to trust. Experts need the same "
                            "architecture; an aggregator works only for the experts it was "
                            "trained for, in that order (picking one fills them in). Without "
                            "one the features are averaged. To compose a picture from parts, "
                            "give each expert its own prompt and describe the whole in the "
                            "main prompt, which is what the aggregator reads (toy-warm-cool: "
                            "“a red circle” and “a blue square” under “a red circle and a blue "
                            "square”, 64×32)."
                        )
                        aggregator = gr.Dropdown(
                            [
                                ("none: uniform feature averaging", ""),
                                *registry.bundled("aggregators"),
                            ],
                            value=default_aggregator(),
                            allow_custom_value=True,
                            label="Aggregator",
                            info="A bundled aggregator or a folder made by training one",
                        )
                        aggregate_rows, aggregate_controls, aggregate_prompts = [], [], []
                        first = aggregator_experts(default_aggregator()) or starts
                        for k in range(PAGE_EXPERTS):
                            with gr.Row(visible=k < 2) as row:
                                aggregate_controls.append(
                                    expert_dropdown(models, (first + starts)[k], k)
                                )
                                aggregate_prompts.append(
                                    gr.Textbox(
                                        "",
                                        label="Prompt (empty: main prompt)",
                                        info="Its own part of the picture; the aggregator "
                                        "reads the main prompt",
                                        scale=4,
                                    )
                                )
                            aggregate_rows.append(row)
                        with gr.Row():
                            aggregate_add = gr.Button("Add expert", size="sm")
                            aggregate_remove = gr.Button("Remove expert", size="sm")
                prompt = gr.Textbox("a red circle", label="Prompt", lines=2)
                negative = gr.Textbox("", label="Negative prompt")
                with gr.Row():
                    scheduler = gr.Dropdown(
                        SAMPLER_CHOICES,
                        value="euler",
                        label="Sampler",
                        info="Superpose always uses its own Euler–Maruyama steps",
                    )
                    steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps")
                    cfg = gr.Slider(0, 20, value=5.0, step=0.5, label="CFG scale")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=2**32 - 1)
                    dice = gr.Button("Random", scale=0, min_width=80)
                    count = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images")
                with gr.Row():
                    width = gr.Slider(0, 2048, value=0, step=8, label="Width (0 = model's own)")
                    height = gr.Slider(0, 2048, value=0, step=8, label="Height (0 = model's own)")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary")
                    halt = gr.Button("Stop", variant="stop")
            with gr.Column(scale=6):
                gallery = gr.Gallery(
                    label="Results",
                    format="png",
                    columns=4,
                    height="auto",
                    object_fit="contain",
                    elem_id="results",
                )
                status = gr.Markdown("")
                with gr.Row():
                    share_button = gr.Button("Share", size="sm")
                    listed = gr.Checkbox(False, label="Also list it under Shared", scale=0)
                    rerun = gr.Button("Re-run", size="sm", visible=False)
                with gr.Group(visible=False) as links:
                    link = gr.Textbox(
                        label="Link to this generation (recipe and images)",
                        buttons=["copy"],
                        interactive=False,
                        elem_id="share-link",
                    )
                    stateless_link = gr.Textbox(
                        label="Link with the recipe only (needs no storage on the server)",
                        buttons=["copy"],
                        interactive=False,
                        elem_id="recipe-link",
                    )
                plot = gr.LinePlot(
                    x="step",
                    y="kappa",
                    color="expert",
                    y_lim=[0, 1],
                    y_title="κ (expert weight)",
                    label="κ per step",
                    visible=False,
                    height=300,
                )
                maps_view = gr.Image(
                    label="Aggregation maps", visible=False, format="png", interactive=False
                )
                dropped = gr.Image(
                    type="pil",
                    label="Drop a PNG made here to restore its recipe",
                    sources=["upload"],
                    format="png",
                    height=160,
                )
                with gr.Accordion("Recipe", open=False):
                    recipe_box = gr.Code(language="json", label="Recipe JSON", interactive=True)
                    with gr.Row():
                        show = gr.Button("Show recipe of the controls")
                        apply = gr.Button("Set controls from this recipe")
                        run_json = gr.Button("Generate from this recipe")
                with gr.Accordion("Shared", open=False) as shared_box:
                    shared_gallery = gr.Gallery(
                        label="Latest generations shared with “list it”; click one to open it",
                        format="png",
                        columns=6,
                        height="auto",
                        object_fit="contain",
                        allow_preview=False,
                    )
                    shared_ids = gr.State([])

        CONTROLS[:] = [
            method,
            model,
            *lora_controls,
            mode,
            temperature,
            temperature_cfg,
            shown,
            *row_controls,
            exact_bias,
            merge_method,
            merge_base,
            density,
            lam,
            merge_seed,
            sign_rule,
            trim_scope,
            consensus_of,
            block_weights,
            merge_shown,
            *merge_controls,
            aggregator,
            aggregate_shown,
            *aggregate_controls,
            *aggregate_prompts,
            prompt,
            negative,
            scheduler,
            steps,
            cfg,
            seed,
            width,
            height,
            count,
        ]
        assert len(CONTROLS) == len(control_names())
        restored = [*CONTROLS, recipe_box, tabs, *rows, *merge_rows, *aggregate_rows]
        outputs = [gallery, recipe_box, status, kappas, plot, last]
        job = go.click(run_controls, CONTROLS, outputs, api_visibility="undocumented")
        job_json = run_json.click(run_recipe, [recipe_box], outputs, api_name="generate")
        job_rerun = rerun.click(run_recipe, [rerun_recipe], outputs, api_visibility="undocumented")
        halt.click(stop, None, None, cancels=[job, job_json, job_rerun], queue=False)
        for event in (job, job_json, job_rerun):
            event.then(maps_picture, [kappas], maps_view, api_visibility="private")
        share_button.click(share, [last, listed], [link, stateless_link], api_name="share").success(
            lambda: gr.update(visible=True), None, links, queue=False, api_visibility="private"
        )
        gallery.change(
            lambda: gr.update(visible=False), None, links, queue=False, api_visibility="private"
        )  # the links belong to the images they were made for
        opened = [*restored, gallery, status, last, rerun_recipe, rerun]
        demo.load(open_link, None, opened, api_visibility="undocumented")
        shared_box.expand(
            list_shared, None, [shared_gallery, shared_ids], api_visibility="undocumented"
        )
        shared_gallery.select(open_shared, [shared_ids], opened, api_visibility="undocumented")
        gallery.select(select_image, [kappas], [plot, maps_view], queue=False)
        tab_single.select(lambda: "single", None, method, queue=False)
        tab_superpose.select(lambda: "superpose", None, method, queue=False)
        tab_merge.select(lambda: "merge", None, method, queue=False)
        tab_aggregate.select(lambda: "aggregate", None, method, queue=False)
        temperature_cfg.change(
            lambda follows: gr.update(interactive=not follows),
            temperature_cfg,
            temperature,
            queue=False,
            api_visibility="private",
        )
        aggregator.input(
            choose_aggregator,
            [aggregator, aggregate_shown],
            [aggregate_shown, *aggregate_rows, *aggregate_controls],
            queue=False,
        )
        aggregate_add.click(
            lambda n: change_rows(n, +1),
            aggregate_shown,
            [aggregate_shown, *aggregate_rows],
            queue=False,
        )
        aggregate_remove.click(
            lambda n: change_rows(n, -1),
            aggregate_shown,
            [aggregate_shown, *aggregate_rows],
            queue=False,
        )
        merge_add.click(
            lambda n: change_rows(n, +1), merge_shown, [merge_shown, *merge_rows], queue=False
        )
        merge_remove.click(
            lambda n: change_rows(n, -1), merge_shown, [merge_shown, *merge_rows], queue=False
        )
        export_button.click(export_merge, CONTROLS, exported, api_name="export_merge")
        add.click(lambda n: change_rows(n, +1), shown, [shown, *rows], queue=False)
        remove.click(lambda n: change_rows(n, -1), shown, [shown, *rows], queue=False)
        dice.click(lambda: random.randint(0, 2**32 - 1), None, seed, queue=False)
        show.click(current_recipe, CONTROLS, recipe_box, queue=False)
        apply.click(
            restore_from_recipe,
            [recipe_box, *CONTROLS],
            restored,
            api_visibility="undocumented",
        )
        dropped.upload(
            restore_from_png, [dropped, *CONTROLS], restored, api_visibility="undocumented"
        )
    return demo


def main() -> None:
    registry.quiet_libraries()
    if os.environ.get("SPACES_ZERO_GPU"):
        preload()
    demo = build()
    demo.queue(default_concurrency_limit=int(os.environ.get("COMPOSER_CONCURRENCY", "1")))
    demo.launch(allowed_paths=[str(OUTPUT_DIR)])


if __name__ == "__main__":
    main()
