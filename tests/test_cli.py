import json
import subprocess
import sys

from PIL import Image


def cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "composer", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
    )


def write_recipe(tmp_path, model, **sampler):
    path = tmp_path / "recipe.json"
    path.write_text(
        json.dumps(
            {
                "prompt": "a red circle",
                "experts": [{"model": model}],
                "sampler": {"steps": 3, "num_images": 2, "seed": 4, **sampler},
            }
        )
    )
    return path


def test_generate_writes_pngs_and_prints_one_json_line_per_image(tiny_sd1, tmp_path):
    out = tmp_path / "out"
    done = cli(
        "generate",
        str(write_recipe(tmp_path, tiny_sd1)),
        "--out",
        str(out),
        "--set",
        "sampler.seed=9",
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["seed"] for line in lines] == [9, 10]
    assert [line["path"] for line in lines] == [str(out / "00000.png"), str(out / "00001.png")]
    assert all(line["seconds"] > 0 for line in lines)
    with Image.open(out / "00001.png") as im:
        assert "Seed: 10" in im.info["parameters"]

    info = cli("info", str(out / "00001.png"))
    assert info.returncode == 0, info.stderr
    recipe = json.loads(info.stdout)
    assert recipe["sampler"]["seed"] == 10 and recipe["sampler"]["num_images"] == 1
    assert recipe["experts"][0]["model"] == tiny_sd1


def test_bad_recipe_exits_non_zero_with_the_message_and_no_traceback(tiny_sd1, tmp_path):
    done = cli(
        "generate", str(write_recipe(tmp_path, tiny_sd1, steps=-3)), "--out", str(tmp_path / "o")
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: sampler.steps: -3 is not accepted")
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_unknown_model_missing_file_and_broken_json_are_one_line_errors(tmp_path):
    cases = [
        (
            ["generate", str(write_recipe(tmp_path, "no-such-model")), "--out", str(tmp_path)],
            "error: experts[0].model: unknown model 'no-such-model'",
        ),
        (
            ["generate", str(tmp_path / "missing.json"), "--out", str(tmp_path)],
            "error: recipe: cannot read",
        ),
        (["generate", "-", "--out", str(tmp_path)], "error: recipe: - is not valid JSON"),
        (["info", str(tmp_path / "missing.png")], "error: image:"),
    ]
    for args, message in cases:
        done = cli(*args, stdin="{")
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith(message), done.stderr
        assert "Traceback" not in done.stderr


def test_models_lists_the_bundled_zoo():
    from composer import registry

    done = cli("models", "--json")
    assert done.returncode == 0
    listing = json.loads(done.stdout)
    assert listing["models"] == sorted(registry.bundled("models"))
    assert listing["loras"] == sorted(registry.bundled("loras"))
