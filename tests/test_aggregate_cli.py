"""``python -m composer aggregate train``: an aggregator for the user's own experts and images."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from composer.__main__ import main as composer_main
from composer.training.cli import main as aggregate_main
from composer.training.data import buckets, load_pixels, nearest_bucket
from pipelines.aggregation import Aggregator
from tests.conftest import build_sdxl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three 16×16 pictures and a 24×16 one (3:2), three with captions."""
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
    return aggregate_main(["train", *map(str, args)])


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
    # The 3:2 picture trains in the bucket of ≤ 16² pixels nearest 3:2 (multiples of 4, the
    # tiny model's size step): 20×12 (5:3), not cropped square.
    assert record["buckets"] == {"16×16": 3, "20×12": 1}
    assert record["config"] == {"width": 8, "heads": 2, "depth": 1, "groups": 4,
                                "position_channels": 0}  # fmt: skip
    card = (out / "README.md").read_text()
    assert "Steps: 3 of 3" in card and "4 images" in card and "1 without a caption" in card
    assert "buckets 16×16 (3), 20×12 (1)" in card

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


def test_each_expert_reads_its_own_caption_and_the_aggregators_the_whole(
    tiny_sd1, tiny_sd1_other, tmp_path, monkeypatch
):
    """``NAME.k.txt`` is expert k's caption; ``NAME.txt`` goes to the aggregators (averaged over
    the experts' text encoders, as ``aggregator_prompt`` at inference); an image without part
    files gives every expert its caption."""
    from pipelines.aggregation import training

    folder = tmp_path / "parts"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    (folder / "00.txt").write_text("a cat and a dog")
    (folder / "00.1.txt").write_text("a cat")
    (folder / "00.2.txt").write_text("a dog")
    (folder / "01.txt").write_text("a fox")
    seen, original = [], training.denoising_loss

    def spy(*args, **kwargs):
        seen.append(([t.detach().clone() for t in args[6]], kwargs["aggregator_text"].clone()))
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "denoising_loss", spy)
    args = [*common(folder, tmp_path / "agg", 4), "--caption-drop", 0]
    assert run("--experts", tiny_sd1, tiny_sd1_other, *args) == 0
    record = json.loads((tmp_path / "agg" / "training.json").read_text())
    assert record["with_expert_captions"] == 1

    pipes = [StableDiffusionPipeline.from_pretrained(m) for m in (tiny_sd1, tiny_sd1_other)]

    def encode(k, text):
        return pipes[k].encode_prompt(text, "cpu", 1, False)[0][0]

    images = {  # per image: each expert's caption, then the whole one
        0: (["a cat", "a dog"], "a cat and a dog"),
        1: (["a fox", "a fox"], "a fox"),
    }
    drawn = set()
    for conds, whole in seen:
        for b in range(len(whole)):
            match = [
                j
                for j, (own, _) in images.items()
                if torch.allclose(conds[0][b], encode(0, own[0]))
            ]
            assert len(match) == 1
            own, caption = images[match[0]]
            assert torch.allclose(conds[1][b], encode(1, own[1]))
            mean = (encode(0, caption) + encode(1, caption)) / 2
            assert torch.allclose(whole[b], mean, atol=1e-6)
            drawn.add(match[0])
    assert drawn == {0, 1}


def kohya_buckets(size, low, high, step):
    """kohya-ss sd-scripts' ``make_bucket_resolutions`` (library/model_util.py), the reference."""
    found = {(size // step * step,) * 2}
    for width in range(low, high + 1, step):
        height = min(high, size * size // width // step * step)
        if height >= low:
            found |= {(width, height), (height, width)}
    return sorted(found)


def test_buckets_are_kohyas():
    """At 512 with SD's size step 64, kohya's defaults (sides 256 … 1024) are the 4:1 limit."""
    assert buckets(512, 64) == kohya_buckets(512, 256, 1024, 64)
    assert all(w * h <= 1024**2 for w, h in buckets(1024, 64))
    # 3:2 (log 0.405) lies nearest 640×384 (5:3, log 0.511); 576×448 is 9:7 (log 0.251).
    assert nearest_bucket(768, 512, buckets(512, 64)) == (640, 384)
    assert nearest_bucket(300, 300, buckets(512, 64)) == (512, 512)
    assert nearest_bucket(512, 4000, buckets(512, 64)) == (256, 1024)


def test_wide_pictures_keep_their_sides_and_train_in_their_bucket(
    tiny_sd1, tiny_sd1_other, tmp_path, monkeypatch
):
    """A 3:1 picture with a red left end and a blue right end: loaded at its bucket both ends are
    there (a square crop would keep only the white middle), and training steps see latents of
    both the square and the wide bucket."""
    from pipelines.aggregation import training

    folder = tmp_path / "wide"
    folder.mkdir()
    stripes = np.full((16, 48, 3), 255, np.uint8)
    stripes[:, :12] = (255, 0, 0)
    stripes[:, -12:] = (0, 0, 255)
    for i in range(2):
        Image.fromarray(stripes).save(folder / f"wide{i}.png")
        Image.new("RGB", (16, 16), (0, 128, 0)).save(folder / f"square{i}.png")
    pixels = load_pixels([folder / "wide0.png"], 24, 8)[0]
    assert pixels.shape == (3, 8, 24)
    assert torch.allclose(pixels[:, :, 0], torch.tensor([1.0, -1, -1])[:, None], atol=0.05)
    assert torch.allclose(pixels[:, :, -1], torch.tensor([-1.0, -1, 1])[:, None], atol=0.05)

    seen, original = set(), training.denoising_loss

    def spy(*args, **kwargs):
        seen.add(tuple(args[3].shape[2:]))
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "denoising_loss", spy)
    out = tmp_path / "agg"
    assert run("--experts", tiny_sd1, tiny_sd1_other, *common(folder, out, 8)) == 0
    assert json.loads((out / "training.json").read_text())["buckets"] == {"16×16": 2, "24×8": 2}
    factor = StableDiffusionPipeline.from_pretrained(tiny_sd1).vae_scale_factor
    assert seen == {(16 // factor, 16 // factor), (8 // factor, 24 // factor)}


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
        ({"data": "expert3"}, "x.3.txt is a caption for expert 3, but there are 2 experts"),
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
    elif change.get("data") == "expert3":
        folder = tmp_path / "expert3"
        folder.mkdir()
        Image.new("RGB", (16, 16)).save(folder / "x.png")
        (folder / "x.3.txt").write_text("a third expert's part")
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
