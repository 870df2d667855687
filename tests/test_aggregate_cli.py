"""``python -m composer.aggregate train``: an aggregator for the user's own experts and images."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from composer import aggregate
from composer.__main__ import main as composer_main
from pipelines.aggregation import Aggregator
from tests.conftest import build_sdxl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four 16×16 pictures (one a 24×16 that must be cropped), three with captions."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i, size in enumerate([(16, 16), (16, 16), (24, 16), (16, 16)]):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        if i < 3:
            (folder / f"{i:02d}.txt").write_text(f"a picture number {i}\n")
    (folder / "notes.md").write_text("not an image, ignored")
    return folder


def run(*args):
    return aggregate.main(["train", *map(str, args)])


def unets(*models, cls=StableDiffusionPipeline):
    return [cls.from_pretrained(m).unet for m in models]


def common(data, out, steps):
    return ["--data", data, "--out", out, "--steps", steps, "--batch", 2, "--lr", 1e-2,
            "--width", 8, "--heads", 2, "--groups", 4, "--save-every", 2]  # fmt: skip


def test_trains_saves_binds_and_resumes(tiny_sd1, tiny_sd1_other, data, tmp_path, capsys):
    out = tmp_path / "agg"
    assert run("--experts", tiny_sd1, tiny_sd1_other, *common(data, out, 3)) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["step"] == 3 and np.isfinite(printed["loss"])
    record = json.loads((out / "training.json").read_text())
    assert record["step"] == 3 and record["images"] == 4 and record["uncaptioned"] == 1
    assert record["size"] == 16 and record["prediction_type"] == "epsilon"
    assert record["config"] == {"width": 8, "heads": 2, "depth": 1, "groups": 4,
                                "position_channels": 0}  # fmt: skip
    card = (out / "README.md").read_text()
    assert "Steps: 3 of 3" in card and "4 images" in card and "1 without a caption" in card

    trained = Aggregator.from_pretrained(out)
    pair = unets(tiny_sd1, tiny_sd1_other)
    trained.check_experts(pair)  # bound to exactly these experts, in this order
    with pytest.raises(ValueError, match="trained for"):
        trained.check_experts(pair[::-1])
    # It learned: the zero-initialised output convolutions (uniform averaging) have moved.
    moved = [p.proj_out.weight.abs().max().item() for p in trained.points]
    assert max(moved) > 0

    # The same command with more steps resumes from step 3 rather than starting over.
    assert run("--experts", tiny_sd1, tiny_sd1_other, *common(data, out, 5)) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["step"] == 5
    assert [r["from_step"] for r in record["runs"]] == [0, 3]
    resumed = Aggregator.from_pretrained(out)
    assert not torch.equal(resumed.points[0].proj_out.weight, trained.points[0].proj_out.weight)
    # Asking for no more steps than done trains nothing.
    assert run("--experts", tiny_sd1, tiny_sd1_other, *common(data, out, 4)) == 0
    assert json.loads((out / "training.json").read_text())["step"] == 5


def test_resuming_with_other_experts_is_refused(tiny_sd1, tiny_sd1_other, data, tmp_path, capsys):
    out = tmp_path / "agg"
    assert run("--experts", tiny_sd1, tiny_sd1_other, *common(data, out, 1)) == 0
    capsys.readouterr()
    assert run("--experts", tiny_sd1_other, tiny_sd1, *common(data, out, 2)) == 2
    err = capsys.readouterr().err
    assert "trained for" in err and "train into another folder" in err


def test_sdxl_experts_train_with_their_added_conditioning(tiny_sdxl, data, tmp_path):
    other = build_sdxl(tmp_path / "other", seed=1)
    out = tmp_path / "agg"
    assert run("--experts", tiny_sdxl, other, *common(data, out, 1)) == 0
    Aggregator.from_pretrained(out).check_experts(
        unets(tiny_sdxl, other, cls=StableDiffusionXLPipeline)
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"data": "empty"}, "holds no images"),
        ({"data": "broken"}, "broken.png is not a readable image"),
        ({"data": "missing"}, "is not a folder"),
        ({"size": 18}, "--size: 18 is not accepted; expected a multiple of 4"),
        ({"steps": 0}, "--steps: 0 is not accepted"),
        ({"experts": 1}, "at least two models"),
        ({"experts": "sdxl"}, "different latent spaces|architecture"),
        ({"experts": "nonsense"}, "unknown model 'no-such-model'"),
    ],
)
def test_bad_input_is_one_clear_line(
    change, message, tiny_sd1, tiny_sd1_other, tiny_sdxl, data, tmp_path, capsys
):
    folder = data
    if change.get("data") == "empty":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif change.get("data") == "broken":
        folder = tmp_path / "broken"
        folder.mkdir()
        (folder / "broken.png").write_bytes(b"not a png")
    elif change.get("data") == "missing":
        folder = tmp_path / "nowhere"
    experts = {
        None: [tiny_sd1, tiny_sd1_other],
        1: [tiny_sd1],
        "sdxl": [tiny_sd1, tiny_sdxl],
        "nonsense": [tiny_sd1, "no-such-model"],
    }[change.get("experts")]
    args = ["--experts", *experts, *common(folder, tmp_path / "out", change.get("steps", 1))]
    if "size" in change:
        args += ["--size", change["size"]]
    assert run(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "out" / "training.json").exists()


def test_the_main_command_line_hands_over(capsys):
    with pytest.raises(SystemExit) as stop:
        composer_main(["aggregate", "train", "--help"])
    assert stop.value.code == 0
    assert "--experts" in capsys.readouterr().out
    listed = subprocess.run(
        [sys.executable, "-m", "composer", "--help"], capture_output=True, text=True, check=True
    )
    assert "aggregate" in listed.stdout
