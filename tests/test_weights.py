"""Checkpoints as downloaded and weights validated once on load (issues 19 and 20): damaged
headers, non-finite values and wrong shapes refused in one line naming the file and the first bad
tensor; fp16, bf16 and float8 single files upcast; SD 2.x v-prediction detected; NaN never
dropped silently by a merge."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from composer import registry
from composer.__main__ import main
from composer.checkpoints.ldm_format import UNET_PREFIX, save_single_file
from composer.checkpoints.validate import WeightsError, check_header
from composer.merge.methods import magnitude_threshold, ties
from composer.recipe import RecipeError

TO_Q = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"


def write_header(path, header: dict, body: bytes = b"", raw: bytes | None = None) -> str:
    blob = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + body)
    return str(path)


def load(path):
    return registry.load_pipeline(
        registry.resolve_model(str(path)), torch.device("cpu"), torch.float32
    )


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory):
    """toy-base as one single file (our export layout), its tensors and metadata."""
    folder = tmp_path_factory.mktemp("toy-file")
    pipe = StableDiffusionPipeline.from_pretrained(registry.bundled("models")["toy-base"])
    path = folder / "toy.safetensors"
    save_single_file(pipe, path, "toy-base")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return path, load_file(str(path)), meta, pipe


ONE = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(
    "header, body, raw, reason",
    [
        (None, b"\0" * 16, b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
         b'"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}',
         "names tensor w twice"),
        (ONE, b"\0" * 4, None, "truncated"),
        (ONE, b"\0" * 12, None, "trailing bytes"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None,
         r"tensor w is F32 \[3\] but spans 8 bytes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None,
         "tensor b starts at byte 4"),
        ({"__metadata__": {"format": "pt"}}, b"", None, "holds no tensors"),
        (None, b"", b"[1, 2]", "not a JSON object"),
        ({"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None,
         "unknown dtype"),
    ],
)  # fmt: skip
def test_a_damaged_header_is_refused_naming_the_file_and_tensor(
    tmp_path, header, body, raw, reason
):
    path = write_header(tmp_path / "bad.safetensors", header, body, raw)
    with pytest.raises(WeightsError, match=reason):
        check_header(path)
    for resolve in (registry.resolve_model, registry.resolve_lora):
        with pytest.raises(RecipeError, match=f"'{path}' is not a readable .safetensors file"):
            resolve(path)


def test_a_pickle_renamed_safetensors_is_refused_by_the_cli_in_one_line(tmp_path, capsys):
    path = tmp_path / "evil.safetensors"
    torch.save({"w": torch.zeros(3)}, path)
    code = main(["lora", "merge", str(path), str(path), "--out", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not a readable .safetensors" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_a_valid_header_passes_and_lists_its_tensors(tmp_path):
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.float16)}, tmp_path / "ok.st")
    assert set(check_header(tmp_path / "ok.st")) == {"a", "b"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn,
                                   torch.float8_e5m2])  # fmt: skip
def test_half_and_float8_single_files_load_upcast(toy_file, tmp_path, dtype):
    _, tensors, meta, pipe = toy_file
    low = tmp_path / "low.safetensors"
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, low,
              metadata=meta)  # fmt: skip
    back = load(low)
    assert {p.dtype for p in back.unet.parameters()} == {torch.float32}
    ours, theirs = back.unet.state_dict(), pipe.unet.state_dict()
    for key in ours:
        expected = theirs[key].to(dtype).float()
        assert torch.equal(ours[key], expected), key


def with_nan(toy_file, folder, dtype=torch.float32) -> str:
    """toy_file in ``dtype`` with one NaN in ``TO_Q``."""
    _, tensors, meta, _ = toy_file
    bad = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    bad[TO_Q] = bad[TO_Q].float().clone()
    bad[TO_Q][3, 1] = float("nan")
    bad[TO_Q] = bad[TO_Q].to(dtype)
    save_file(bad, folder / "nan.safetensors", metadata=meta)
    return str(folder / "nan.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e5m2])
def test_a_nan_in_a_single_file_is_refused_naming_the_file_and_its_tensor(
    toy_file, tmp_path, dtype
):
    nan = with_nan(toy_file, tmp_path, dtype)
    with pytest.raises(RecipeError, match=f"{nan}: tensor {TO_Q} holds a non-finite value"):
        load(nan)


def test_an_inf_in_a_diffusers_folder_is_refused_naming_its_file(tiny_sd1, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_sd1, folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    key = sorted(state)[5]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("inf")
    save_file(state, weights)
    with pytest.raises(RecipeError, match=f"vae/diffusion_pytorch_model.safetensors: tensor {key}"):
        load(folder)


def test_a_unet_tensor_of_the_wrong_shape_is_refused_naming_it(toy_file, tmp_path):
    _, tensors, meta, _ = toy_file
    bad = dict(tensors)
    bad[TO_Q] = torch.zeros(bad[TO_Q].shape[0] + 1, bad[TO_Q].shape[1])
    wrong = tmp_path / "wrong.safetensors"
    save_file(bad, wrong, metadata=meta)
    with pytest.raises(RecipeError, match=rf"tensor {TO_Q} is \[\d+, \d+\], the U-Net"):
        load(wrong)


def test_a_single_file_with_ema_weights_loads_its_trained_weights(toy_file, tmp_path):
    """A1111-era files keep an EMA copy of the U-Net (``model_ema.<key without dots>``); the
    trained weights load, as from the pruned file (without the copy)."""
    _, tensors, meta, pipe = toy_file
    with_ema = dict(tensors)
    for key, value in tensors.items():
        if key.startswith(UNET_PREFIX):
            with_ema["model_ema." + key[len("model.") :].replace(".", "")] = value + 1
    with_ema["model_ema.decay"] = torch.tensor(0.9999)
    ema = tmp_path / "ema.safetensors"
    save_file(with_ema, ema, metadata=meta)
    ours, theirs = load(ema).unet.state_dict(), pipe.unet.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def sd2_file(folder, bias: float) -> str:
    """A tiny SD 2.x-shaped single file (cross-attention width 1024) whose U-Net output at
    t = 999 is about ``bias`` (its ``conv_out`` zeroed)."""
    from conftest import SCHEDULER, TINY_SD1_UNET, _text_config, _vae

    from toyworld.tokenizer import save_tokenizer

    torch.manual_seed(0)
    tokenizer = save_tokenizer(folder / "tok")
    unet = UNet2DConditionModel(**{**TINY_SD1_UNET, "cross_attention_dim": 1024})
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.constant_(unet.conv_out.bias, bias)
    config = _text_config(len(tokenizer))
    config.hidden_size = 1024
    from diffusers import EulerDiscreteScheduler

    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=_vae(),
        text_encoder=CLIPTextModel(config),
        tokenizer=tokenizer,
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "configs")
    path = folder / "sd2.safetensors"
    save_single_file(pipe, path, str(folder / "configs"))
    return str(path)


@pytest.mark.parametrize("bias, expected", [(-5.0, "v_prediction"), (5.0, "epsilon")])
def test_sd2_single_files_say_whether_they_predict_v(tmp_path, bias, expected):
    pipe = load(sd2_file(tmp_path, bias))
    assert pipe.scheduler.config.prediction_type == expected


def test_a_v_pred_marker_makes_a_single_file_predict_v(toy_file, tmp_path):
    path, tensors, meta, _ = toy_file
    marked = tmp_path / "vpred.safetensors"
    save_file({**tensors, "v_pred": torch.tensor([])}, marked, metadata=meta)
    assert load(path).scheduler.config.prediction_type == "epsilon"
    assert load(marked).scheduler.config.prediction_type == "v_prediction"


def test_ties_refuses_a_task_vector_holding_nan_instead_of_dropping_it():
    values = torch.randn(2, 50)
    values[1, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinity"):
        magnitude_threshold(values, 0.2)
    base = torch.zeros(50)
    with pytest.raises(ValueError, match="NaN or infinity"):
        ties(base, [values[0], values[1]], density=0.2)


def test_an_export_with_a_nan_expert_is_refused_and_writes_nothing(toy_file, tmp_path, capsys):
    path, nan = toy_file[0], with_nan(toy_file, tmp_path)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({
        "prompt": "a red circle", "method": "merge",
        "experts": [{"model": str(path)}, {"model": nan}],
        "merge": {"method": "ties", "base": "toy-base"},
    }))  # fmt: skip
    out = tmp_path / "out.safetensors"
    assert main(["merge", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a non-finite value" in err and nan in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
