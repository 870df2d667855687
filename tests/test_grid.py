"""The comparison grid (issue 21): a 3×3 grid of TIES density × seed on the toy zoo in one
process, each cell the same pixels as its recipe run alone, and a labelled picture of the right
size with every cell's PNG carrying its own recipe."""

import json

import numpy as np
import pytest

from composer import engine, grid
from composer.__main__ import main
from composer.recipe import RecipeError, parse
from composer.sharing.pnginfo import read_recipe

TIES = {
    "prompt": "a red circle",
    "method": "merge",
    "experts": [{"model": "toy-warm"}, {"model": "toy-cool"}],
    "merge": {"method": "ties", "base": "toy-base", "density": 0.2, "lambda": 1.0},
    "sampler": {"steps": 6, "num_images": 1},
}


def test_a_ties_density_by_seed_grid_equals_each_recipe_run_alone(tmp_path, capsys):
    path = tmp_path / "ties.json"
    path.write_text(json.dumps(TIES))
    out = tmp_path / "grid"
    x, y = "merge.density=0.2,0.5,0.8", "sampler.seed=1,2,3"
    assert main(["grid", str(path), "--x", x, "--y", y, "--out", str(out)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 10
    from PIL import Image

    picture = Image.open(out / "grid.png")
    assert picture.size == grid.grid_size(3, 3, (32, 32), titled_rows=True)
    assert picture.size == (
        grid.LABEL_WIDTH + 3 * 128 + 2 * grid.GAP,
        grid.LABEL_HEIGHT + 3 * 128 + 2 * grid.GAP,
    )
    for row, seed in enumerate((1, 2, 3)):
        for column, density in enumerate((0.2, 0.5, 0.8)):
            cell = out / f"cell-{row}-{column}.png"
            recipe = read_recipe(cell)
            assert recipe.sampler.seed == seed and recipe.sections["merge"].density == density
            alone = engine.generate(recipe)
            assert np.array_equal(np.asarray(Image.open(cell).convert("RGB")),
                                  np.asarray(alone.images[0].convert("RGB")))  # fmt: skip


def test_a_bad_value_names_its_cell_before_anything_runs():
    with pytest.raises(RecipeError, match=r"grid cell merge\.density=7"):
        grid.run(TIES, grid.parse_axis("merge.density=0.5,7"), parse=parse)
    with pytest.raises(RecipeError, match=r"expected key\.path=value"):
        grid.parse_axis("merge.density")
