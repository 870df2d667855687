"""Diffusion Composer's page: layout and event wiring only. ``python app.py`` serves it.

Every action goes through a recipe: the controls are turned into recipe JSON, parsed by
``composer.recipe.parse`` (the one validation), run by ``composer.engine``; a dropped PNG or a
pasted recipe is parsed the same way and written back into the controls.
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

from composer import engine, registry
from composer.pnginfo import read_recipe
from composer.recipe import (
    A1111_SAMPLERS,
    MAX_IMAGES,
    MAX_STEPS,
    MERGE_METHODS,
    Merge,
    RecipeError,
    parse,
)

log = logging.getLogger("composer.app")
LORA_SLOTS = 3
PAGE_EXPERTS = 4
"""Expert rows on the Superpose tab; recipes with more experts run from the Recipe panel."""
PAGE_METHODS = ("single", "superpose", "merge")
"""Methods the controls can express; any method the engine runs works from the Recipe panel."""
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
        "shown",
        *(f"expert{k}.{f}" for k in range(PAGE_EXPERTS) for f in ROW_FIELDS),
        "exact_bias",
        *MERGE_FIELDS,
        "merge_shown",
        *(f"merge{k}.{f}" for k in range(PAGE_EXPERTS) for f in ("model", "weight")),
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
            "temperature": c["temperature"],
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
    elif recipe.method == "superpose":
        settings = recipe.superpose
        bias = settings.bias if settings and settings.bias else None
        shares = shares_of(bias) if bias else [1.0] * len(recipe.experts)
        c.update(
            mode=settings.mode if settings else "or",
            temperature=settings.temperature if settings else 1.0,
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


# --- handlers -----------------------------------------------------------------------------------


def run_recipe(recipe_json: str, progress=gr.Progress(), request: gr.Request = None):
    """Generate from recipe JSON: the page's Generate button and the ``generate`` API endpoint.
    Returns the gallery, the recipe as run, a status line, the per-image κ traces (page state)
    and the κ plot of the first image (superposition only)."""
    try:
        recipe = parse(recipe_json, check=registry.check_reference)
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    key = request.session_hash if request is not None else uuid.uuid4().hex
    cancel = _CANCEL[key] = threading.Event()
    try:
        result = engine.generate(
            recipe,
            cancel=cancel,
            progress=lambda done, total: progress((done, total), desc="Sampling", unit="steps"),
        )
    except engine.Cancelled as e:
        gr.Info(f"Stopped; {len(e.images)} image(s) were finished.")
        return [], recipe.to_json(), "Stopped.", None, gr.update(visible=False)
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    except Exception as e:  # keep the server up for the next user; the log has the traceback
        log.exception("generation failed")
        raise gr.Error(f"Generation failed: {e.__class__.__name__}: {e}") from None
    finally:
        _CANCEL.pop(key, None)
    folder = OUTPUT_DIR / uuid.uuid4().hex
    folder.mkdir(parents=True, exist_ok=True)
    gallery = []
    for i, (image, info) in enumerate(zip(result.images, result.metadata, strict=False)):
        path = folder / f"{i:05d}.png"
        image.save(path, format="PNG", pnginfo=info)
        gallery.append((str(path), f"seed {result.seeds[i]}"))
    status = (
        f"{len(result.images)} image(s), {sum(result.seconds):.2f} s on {result.device} "
        f"({sum(result.seconds) / max(len(result.images), 1):.2f} s per image)"
    )
    kappas = None
    plot = gr.update(visible=False, value=None)
    if recipe.method == "superpose" and result.trace:
        kappas = {"labels": expert_labels(recipe), "traces": result.trace, "seeds": result.seeds}
        plot = kappa_plot(kappas, 0)
    return gallery, recipe.to_json(), status, kappas, plot


def kappa_plot(kappas: dict | None, index: int):
    if not kappas or not 0 <= index < len(kappas["traces"]):
        return gr.update(visible=False, value=None)
    return gr.update(
        visible=True,
        value=kappa_frame(kappas["labels"], kappas["traces"][index]),
        label=f"κ per step, image {index + 1} (seed {kappas['seeds'][index]}); click an image",
    )


def select_image(kappas: dict | None, evt: gr.SelectData):
    return kappa_plot(kappas, evt.index if isinstance(evt.index, int) else 0)


def run_controls(*values, progress=gr.Progress(), request: gr.Request = None):
    return run_recipe(json.dumps(recipe_dict(*values)), progress, request)


def stop(request: gr.Request):
    event = _CANCEL.get(request.session_hash)
    if event is not None:
        event.set()


def restore(recipe, current: list | None = None) -> list:
    """Updates for ``[*CONTROLS, recipe_box, tabs, *expert rows]`` showing ``recipe``. A recipe
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
            + [gr.update()] * (2 * PAGE_EXPERTS)
        )
    names = control_names()
    values = control_values(recipe, dict(zip(names, current, strict=True)) if current else None)
    shown = values[names.index("shown")]
    merge_shown = values[names.index("merge_shown")]
    return [
        *values,
        recipe.to_json(),
        gr.update(selected=recipe.method),
        *(gr.update(visible=k < shown) for k in range(PAGE_EXPERTS)),
        *(gr.update(visible=k < merge_shown) for k in range(PAGE_EXPERTS)),
    ]


def restore_from_recipe(recipe_json: str, *current):
    try:
        recipe = parse(recipe_json)
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    return restore(recipe, list(current) or None)


def restore_from_png(image, *current):
    if image is None:
        return [gr.update()] * (len(CONTROLS) + 2 + 2 * PAGE_EXPERTS)
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


def expert_dropdown(models: list[str], value: str, k: int) -> gr.Dropdown:
    """Expert k's model picker on the Superpose and Merge tabs."""
    return gr.Dropdown(
        models, value=value, allow_custom_value=True, label=f"Expert {k + 1}", scale=3
    )


CONTROLS: list = []


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
        exact_bias = gr.State(None)
        kappas = gr.State(None)
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
                            temperature = gr.Slider(
                                0.1, 5, value=1.0, step=0.05, label="Temperature (OR)", scale=2
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
                            "Merge the experts' weights, then sample the result as one model. "
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
                    label="Results", format="png", columns=4, height="auto", object_fit="contain"
                )
                status = gr.Markdown("")
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

        CONTROLS[:] = [
            method,
            model,
            *lora_controls,
            mode,
            temperature,
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
        restored = [*CONTROLS, recipe_box, tabs, *rows, *merge_rows]
        outputs = [gallery, recipe_box, status, kappas, plot]
        job = go.click(run_controls, CONTROLS, outputs, api_visibility="undocumented")
        job_json = run_json.click(run_recipe, [recipe_box], outputs, api_name="generate")
        halt.click(stop, None, None, cancels=[job, job_json], queue=False)
        gallery.select(select_image, [kappas], plot, queue=False)
        tab_single.select(lambda: "single", None, method, queue=False)
        tab_superpose.select(lambda: "superpose", None, method, queue=False)
        tab_merge.select(lambda: "merge", None, method, queue=False)
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
    demo = build()
    demo.queue(default_concurrency_limit=int(os.environ.get("COMPOSER_CONCURRENCY", "1")))
    demo.launch(allowed_paths=[str(OUTPUT_DIR)])


if __name__ == "__main__":
    main()
