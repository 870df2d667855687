"""A comparison grid (AUTOMATIC1111's X/Y plot): one recipe, one or two of its fields swept over
values, one labelled picture with a cell per combination, and each cell's PNG with its own
recipe.

    python -m composer grid merge.json --x merge.density=0.2,0.5,0.8 --y sampler.seed=1,2,3

A cell is the recipe with its ``x`` and ``y`` values set (``key.path=value`` as ``--set`` reads
them) and is run exactly as that recipe alone would be: the same engine call, so its pixels are
the same. Cells run one after another in one process, so loaded models stay in the model cache
and a live merge that two cells share is merged once.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from composer.recipe import Recipe, RecipeError

MIN_CELL = 128
"""Cells are enlarged (nearest neighbour, whole multiples) to at least this many pixels a side,
so that a 32-pixel toy image and its label stay readable."""
GAP = 4
LABEL_HEIGHT = 22
LABEL_WIDTH = 150
"""Room for the column titles above the cells and the row titles left of them."""


@dataclass(frozen=True)
class Axis:
    """One swept field: its recipe path (``merge.density``) and its values, as JSON values."""

    path: str
    values: tuple[Any, ...]

    def label(self, k: int) -> str:
        return f"{self.path}={json.dumps(self.values[k])}"


def parse_axis(spec: str) -> Axis:
    """``merge.density=0.2,0.5,0.8`` → Axis; each value read as JSON when it parses
    (``0.2``, ``null``, ``true``), else as a string (``toy-cool``)."""
    path, sep, raw = spec.partition("=")
    if not sep or not path or not raw:
        raise RecipeError(f"grid axis {spec!r}: expected key.path=value,value,...")
    values = []
    for text in raw.split(","):
        try:
            values.append(json.loads(text))
        except json.JSONDecodeError:
            values.append(text)
    return Axis(path, tuple(values))


@dataclass
class Grid:
    picture: Image.Image
    """The labelled grid: columns are ``x``'s values, rows ``y``'s."""
    cells: list[list[Any]]
    """``cells[row][column]``: each cell's ``engine.Result``."""


def cell_recipe(data: dict, x: Axis, y: Axis | None, column: int, row: int) -> dict:
    """The recipe of one cell: ``data`` with the cell's values set."""
    from composer.__main__ import apply_overrides

    cell = copy.deepcopy(data)
    sets = [f"{x.path}={json.dumps(x.values[column])}"]
    if y is not None:
        sets.append(f"{y.path}={json.dumps(y.values[row])}")
    return apply_overrides(cell, sets)


def run(
    data: dict,
    x: Axis,
    y: Axis | None = None,
    parse: Callable[[dict], Recipe] | None = None,
    on_cell: Callable[[int, int, Any], None] | None = None,
) -> Grid:
    """Every cell of the grid through ``composer.engine.generate``; ``parse`` checks each cell's
    recipe (default: ``composer.recipe.parse`` with the registry's reference check), so a bad
    value is refused, naming the cell, before anything runs."""
    from composer import engine, registry
    from composer.recipe import parse as parse_recipe

    def check(cell: dict) -> Recipe:
        return parse_recipe(cell, check=registry.check_reference)

    parse = parse or check
    rows = len(y.values) if y is not None else 1
    recipes = []
    for row in range(rows):
        recipes.append([])
        for column in range(len(x.values)):
            try:
                recipes[row].append(parse(cell_recipe(data, x, y, column, row)))
            except RecipeError as e:
                where = x.label(column) + (f", {y.label(row)}" if y is not None else "")
                raise RecipeError(f"grid cell {where}: {e}") from None
    cells = []
    for row, line in enumerate(recipes):
        cells.append([])
        for column, recipe in enumerate(line):
            result = engine.generate(recipe)
            cells[row].append(result)
            if on_cell is not None:
                on_cell(row, column, result)
    images = [[result.images[0] for result in line] for line in cells]
    return Grid(picture(images, x, y), cells)


def picture(images: list[list[Image.Image]], x: Axis, y: Axis | None) -> Image.Image:
    """The cells' first images in a grid, enlarged to ``MIN_CELL``, with ``x``'s values above
    the columns and ``y``'s left of the rows."""
    width, height = images[0][0].size
    scale = max(1, -(-MIN_CELL // min(width, height)))
    cell_w, cell_h = width * scale, height * scale
    left = LABEL_WIDTH if y is not None else 0
    size = grid_size(len(x.values), len(images), (width, height), y is not None)
    out = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=13)
    for column in range(len(x.values)):
        cx = left + column * (cell_w + GAP)
        draw.text((cx + 2, 4), _fit(draw, x.label(column), font, cell_w - 4), (0, 0, 0), font)
    for row, line in enumerate(images):
        cy = LABEL_HEIGHT + row * (cell_h + GAP)
        if y is not None:
            label = _fit(draw, y.label(row), font, LABEL_WIDTH - 8)
            draw.text((4, cy + cell_h // 2 - 7), label, (0, 0, 0), font)
        for column, image in enumerate(line):
            big = image.convert("RGB").resize((cell_w, cell_h), Image.Resampling.NEAREST)
            out.paste(big, (left + column * (cell_w + GAP), cy))
    return out


def grid_size(columns: int, rows: int, image: tuple[int, int], titled_rows: bool) -> tuple:
    """The grid picture's (width, height) for ``columns`` × ``rows`` cells of ``image`` size."""
    width, height = image
    scale = max(1, -(-MIN_CELL // min(width, height)))
    left = LABEL_WIDTH if titled_rows else 0
    return (
        left + columns * (width * scale + GAP) - GAP,
        LABEL_HEIGHT + rows * (height * scale + GAP) - GAP,
    )


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    while len(text) > 1 and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…"
    return text


def write(grid: Grid, out: Path) -> list[dict]:
    """``grid.png`` and each cell's first image as ``cell-<row>-<column>.png`` (with its own
    recipe, as ``generate`` writes it) under ``out``; one line per file for the CLI."""
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for row, line in enumerate(grid.cells):
        for column, result in enumerate(line):
            path = out / f"cell-{row}-{column}.png"
            result.images[0].save(path, format="PNG", pnginfo=result.metadata[0])
            lines.append({"path": str(path), "row": row, "column": column})
    grid.picture.save(out / "grid.png", format="PNG")
    lines.append({"path": str(out / "grid.png"), "size": list(grid.picture.size)})
    return lines
