"""Result views: the κ plot of a superposition and the aggregation maps of an AFA image."""

from __future__ import annotations

import gradio as gr

from composer.methods import METHODS
from composer.recipe import Recipe

MAP_POINTS = 4
"""Aggregation points pictured beside an image: the first block, the mid block, the last up
block and the output head (from fine to coarse to fine)."""


def expert_labels(recipe: Recipe) -> list[str]:
    """One name per line of the κ plot: the method's own, else ``k: model + LoRAs · prompt``."""
    own = METHODS[recipe.method].labels(recipe)
    if own is not None:
        return own
    return [
        f"{i + 1}: {e.model}"
        + "".join(f" + {lo.path}" for lo in e.loras)
        + f" · {recipe.expert_prompt(i)!r}"
        for i, e in enumerate(recipe.experts)
    ]


def traces(recipe: Recipe, result, paths: list[str]) -> dict | None:
    """What the page keeps to draw an image's κ plot or maps when it is clicked."""
    if result.maps:
        return {"labels": expert_labels(recipe), "maps": result.maps, "paths": paths,
                "seeds": result.seeds}  # fmt: skip
    if any("kappa" in step for steps in result.trace for step in steps):
        return {"labels": expert_labels(recipe), "traces": result.trace, "seeds": result.seeds}
    return None


def kappa_frame(labels: list[str], steps: list[dict]):
    """One image's κ per step as a long table for ``gr.LinePlot`` (step, κ, expert)."""
    import pandas as pd

    rows = [
        {"step": step["step"], "kappa": float(kappa), "expert": labels[min(k, len(labels) - 1)]}
        for step in steps
        for k, kappa in enumerate(step.get("kappa", []))
    ]
    return pd.DataFrame(rows, columns=["step", "kappa", "expert"])


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
    return kappa_plot(kappas, index), *maps_picture(kappas, index)


def maps_picture(kappas: dict | None, index: int = 0):
    """An AFA image beside the maps of where each expert was trusted (expert 1 red, 2 blue,
    3 green, 4 yellow; averaged over the steps), each tile titled with its block, and a caption
    below that wraps; both hidden for other methods."""
    from PIL import Image

    from ui.maps import PALETTE_NAMES, expert_share, side_by_side

    hidden = gr.update(visible=False, value=None)
    if not kappas or "maps" not in kappas or not 0 <= index < len(kappas["maps"]):
        return hidden, gr.update(visible=False, value="")
    maps = kappas["maps"][index]
    names = list(maps)
    shown = [names[1], "mid", names[-2], names[-1]] if len(names) >= MAP_POINTS else names
    with Image.open(kappas["paths"][index]) as image:
        scale = max(1, 256 // max(image.size))
        big = image.convert("RGB").resize(
            (image.width * scale, image.height * scale), Image.Resampling.NEAREST
        )
    labels = kappas["labels"]
    shares = expert_share(maps["mid"]) if "mid" in maps else []
    legend = "; ".join(
        f"**{colour}**: expert {label}" + (f" ({shares[k]:.0%} at mid)" if k < len(shares) else "")
        for k, (colour, label) in enumerate(zip(PALETTE_NAMES, labels, strict=False))
    )
    caption = (
        f"Image {index + 1} (seed {kappas['seeds'][index]}) and where the aggregator trusted each "
        f"expert, averaged over the steps, at the blocks {', '.join(shown)}. {legend}."
    )
    return (
        gr.update(
            visible=True,
            value=side_by_side(big, maps, shown, titled=True),
            label=f"Aggregation maps, image {index + 1}",
        ),
        gr.update(visible=True, value=caption),
    )
