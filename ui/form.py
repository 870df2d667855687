"""The page's controls ⇄ a recipe, by name, without Gradio.

Every control has a name: the page's own (``method``, the prompt and sampler controls in
``COMMON``) and each method's, from its ``Form`` (``composer.methods``):
``"<method>.<control>"``, ``"<method>.shown"`` (how many rows are shown) and
``"<method>.<k>.<control>"`` for row k. ``to_recipe`` reads values by those names and
``from_recipe`` writes them back, so the two are inverse for every recipe a form can show, and a
method added to the registry gets its controls without any change here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from composer.methods import METHODS, Control, Form
from composer.recipe import A1111_SAMPLERS, MAX_IMAGES, MAX_SEED, MAX_STEPS, Recipe

SAMPLER_CHOICES = tuple((name, key) for name, key in A1111_SAMPLERS.items() if key != "ddpm")
COMMON = (
    Control("prompt", "text", "Prompt", "a red circle"),
    Control("negative", "text", "Negative prompt", ""),
    Control(
        "scheduler",
        "choice",
        "Sampler",
        "euler",
        choices=SAMPLER_CHOICES,
        info="Superpose always uses its own Euler–Maruyama steps",
    ),
    Control(
        "steps",
        "slider",
        "Steps",
        20,
        low=0,
        high=MAX_STEPS,
        step=1,
        info=f"1 to {MAX_STEPS}; 0 is refused with a message, not rounded up",
    ),
    Control("cfg", "slider", "CFG scale", 5.0, low=0, high=20, step=0.5),
    Control("seed", "integer", "Seed", 0, low=0, high=MAX_SEED),
    Control("count", "slider", "Images", 4, low=1, high=MAX_IMAGES, step=1),
    Control(
        "batch",
        "slider",
        "Batch size (0 = as many as fit)",
        0,
        low=0,
        high=MAX_IMAGES,
        step=1,
        info="images per pipeline call; a re-run makes the same batches",
    ),
    Control("width", "slider", "Width (0 = model's own)", 0, low=0, high=2048, step=8),
    Control("height", "slider", "Height (0 = model's own)", 0, low=0, high=2048, step=8),
)


def forms(methods: Mapping[str, Any] | None = None) -> dict[str, Form]:
    """The methods that have a page form, in the registry's order."""
    methods = METHODS if methods is None else methods
    return {name: m.form for name, m in methods.items() if m.form is not None}


def shown_rows(form: Form) -> bool:
    """Whether the number of rows shown is the user's choice (Add/Remove), not fixed."""
    return form.rows_title is None and form.rows > 1


def names(methods: Mapping[str, Any] | None = None) -> list[str]:
    """Every control's name, the page's first."""
    out = ["method", *(c.name for c in COMMON)]
    for method, form in forms(methods).items():
        out += [f"{method}.{c.name}" for c in form.controls]
        if shown_rows(form):
            out.append(f"{method}.shown")
        out += [f"{method}.{k}.{c.name}" for k in range(form.rows) for c in form.row]
    return out


def evaluated(value: Any) -> Any:
    return value() if callable(value) else value


def defaults(methods: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every control's starting value (bundled names looked up now)."""
    values: dict[str, Any] = {"method": "single"}
    values.update({c.name: evaluated(c.default) for c in COMMON})
    for method, form in forms(methods).items():
        values.update({f"{method}.{c.name}": evaluated(c.default) for c in form.controls})
        if shown_rows(form):
            values[f"{method}.shown"] = min(form.min_rows, form.rows)
        for k in range(form.rows):
            row = {c.name: evaluated(c.default) for c in form.row}
            row.update(form.row_default(k) if form.row_default else {})
            values.update({f"{method}.{k}.{name}": v for name, v in row.items()})
    return values


def to_recipe(values: Mapping[str, Any], methods: Mapping[str, Any] | None = None) -> dict:
    """The controls' values (by name) → recipe JSON, for ``composer.recipe.parse`` to check."""
    method = values["method"]
    form = forms(methods)[method]
    own = {c.name: values[f"{method}.{c.name}"] for c in form.controls}
    shown = int(values[f"{method}.shown"]) if shown_rows(form) else form.rows
    own["rows"] = [
        {c.name: values[f"{method}.{k}.{c.name}"] for c in form.row} for k in range(shown)
    ]
    return {
        "version": 1,
        "prompt": values["prompt"],
        "negative_prompt": values["negative"],
        "method": method,
        **form.read(own),
        "sampler": {
            "scheduler": values["scheduler"],
            "steps": values["steps"],
            "guidance_scale": values["cfg"],
            "seed": values["seed"],
            "width": values["width"] or None,
            "height": values["height"] or None,
            "num_images": values["count"],
            "batch_size": values["batch"] or None,
        },
    }


def from_recipe(recipe: Recipe, methods: Mapping[str, Any] | None = None) -> dict | None:
    """The values that show ``recipe``: the page's controls, its method's controls and the rows
    it uses (other rows and other methods' controls are not included: they stay as they are).
    ``None`` when no form can show the recipe exactly."""
    form = forms(methods).get(recipe.method)
    own = form.write(recipe) if form is not None else None
    if own is None:
        return None
    s, method = recipe.sampler, recipe.method
    values = {
        "method": method,
        "prompt": recipe.prompt,
        "negative": recipe.negative_prompt,
        "scheduler": s.scheduler,
        "steps": s.steps,
        "cfg": s.guidance_scale,
        "seed": s.seed,
        "width": s.width or 0,
        "height": s.height or 0,
        "count": s.num_images,
        "batch": s.batch_size or 0,
    }
    rows = own.pop("rows")
    values.update({f"{method}.{name}": v for name, v in own.items()})
    if shown_rows(form):
        values[f"{method}.shown"] = len(rows)
    for k, row in enumerate(rows):
        values.update({f"{method}.{k}.{name}": v for name, v in row.items()})
    return values


def fits(recipe: Recipe) -> bool:
    """Whether the controls can show ``recipe`` exactly."""
    return from_recipe(recipe) is not None
