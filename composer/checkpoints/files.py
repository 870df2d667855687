"""A model's weights as memory-mapped files, read one tensor at a time: a diffusers folder or a
single-file checkpoint (SD 1.x or SDXL layout, ``ldm_format``), opened with ``safe_open``.

U-Net and text-encoder parameters are addressed by ``names.merge_name`` whatever the layout (an
SDXL single file's fused OpenCLIP q/k/v is taken apart), the other tensors (VAE, buffers) are
``Part``s of the single-file layout; ``single_file_layout`` is where each goes in an output file.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from composer.checkpoints import ldm_format
from composer.checkpoints.names import merge_name
from composer.checkpoints.validate import first_non_finite
from composer.checkpoints.writer import CODES


class CheckpointError(ValueError):
    """A file that cannot be read as the model it should be. The message names the recipe field
    it came from; callers show it as it is."""


@dataclass(frozen=True)
class Part:
    """One tensor of the output file copied from the first expert (VAE, buffers): its name in the
    single-file layout, its source tensors ((handle, key) each) and the ``ldm_format.assemble``
    op."""

    name: str
    inputs: tuple[tuple[object, str], ...]
    op: str = "copy"

    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(f.get_slice(key).get_shape()) for f, key in self.inputs]

    def shape(self) -> tuple[int, ...]:
        return ldm_format.assembled_shape(self.op, self.shapes())

    def dtype(self) -> torch.dtype:
        f, key = self.inputs[0]
        return _dtype(f.get_slice(key).get_dtype())

    def read(self) -> torch.Tensor:
        return ldm_format.assemble(self.op, [f.get_tensor(key) for f, key in self.inputs])


@dataclass(frozen=True)
class TextSource:
    """Where one text-encoder parameter lies in a model's files: ``key`` of handle ``f``, or
    source ``index`` of ``count`` that ``op`` assembled into it (SDXL single files' OpenCLIP)."""

    f: object
    key: str
    op: str = "copy"
    index: int = 0
    count: int = 1

    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.f.get_slice(self.key).get_shape())
        if self.op == "qkv":
            return (shape[0] // self.count, *shape[1:])
        return tuple(reversed(shape)) if self.op == "t" else shape

    def read(self) -> torch.Tensor:
        return ldm_format.disassemble(self.op, self.f.get_tensor(self.key), self.index, self.count)


class ModelFiles:
    """One model's weights as memory-mapped files: U-Net tensors by diffusers name, text-encoder
    parameters by ``names.merge_name``, and the other tensors (VAE, buffers) as ``Part``s of the
    single-file layout.

    ``location`` is a diffusers folder or a single ``.safetensors`` file; ``config_folder`` is
    the diffusers folder (or bundled model name) whose configs describe it, which an exported
    file names in its metadata (a single file's U-Net config is read from it). ``reference``
    names the model in messages, ``where`` the recipe field."""

    def __init__(
        self, reference: str, location: str, config_folder: str, where: str, stack: ExitStack
    ):
        self.reference, self.where = reference, where
        self.config_folder = config_folder
        self.text: dict[str, TextSource] = {}
        if Path(location).is_file():
            self.unet_file = Path(location)
            f = stack.enter_context(safe_open(location, framework="pt"))
            self.config = _read_json(Path(config_folder) / "unet" / "config.json")
            names = ldm_format.unet_name_map(self.config)  # diffusers → LDM
            keys = set(f.keys())
            prefix = ldm_format.UNET_PREFIX
            self._unet = {d: (f, prefix + k) for d, k in names.items() if prefix + k in keys}
            if len(self._unet) != len(names):
                raise CheckpointError(
                    f"{where}: {reference!r} does not hold the U-Net its config "
                    f"({config_folder}) describes"
                )
            self.parts = []
            for key in sorted(k for k in keys if not k.startswith(prefix)):
                sources = _single_file_text(f, key)
                if sources:
                    self.text.update(sources)
                else:
                    self.parts.append(_single_file_part(f, key))
            return
        folder = Path(location)
        self.config = _read_json(folder / "unet" / "config.json")
        self.unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
        self._unet = _open_all(folder / "unet", "diffusion_pytorch_model", stack, where)
        vae = _open_all(folder / "vae", "diffusion_pytorch_model", stack, where)
        vae_config = _read_json(folder / "vae" / "config.json")
        self.parts = [
            Part(entry.name, tuple(vae[k] for k in entry.sources), entry.op)
            for entry in ldm_format.vae_layout(vae, vae_config)
        ]
        xl = (folder / "text_encoder_2").is_dir()
        for component, (prefix, open_clip) in ldm_format.text_prefixes(xl).items():
            files = _open_all(folder / component, "model", stack, where)
            try:
                ldm_format.text_layout(files, prefix, open_clip)
            except KeyError as e:
                raise CheckpointError(
                    f"{where}: {reference!r} has a {component} tensor that the single-file "
                    f"layout has no name for ({e})"
                ) from None
            for key, (f, k) in files.items():
                if key.endswith(".position_ids"):
                    if not open_clip:  # a buffer, kept as the first expert has it
                        name = prefix + ldm_format.clip_inner(key)
                        self.parts.append(Part(name, ((f, k),)))
                    continue
                self.text[merge_name(component, key)] = TextSource(f, k)

    def components(self) -> list[str]:
        """What this model has of a merge's components: ``unet``, then its text encoders."""
        return ["unet", *sorted({n.partition(".")[0] for n in self.text})]

    def names(self, component: str) -> list[str]:
        """The parameters of ``component`` (``merge_name`` spelling)."""
        if component == "unet":
            return list(self._unet)
        return [n for n in self.text if n.partition(".")[0] == component]

    def shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        return {n: self.shape(n) for n in self.names(component)}

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.text:
            return self.text[name].shape()
        f, key = self._unet[name]
        return tuple(f.get_slice(key).get_shape())

    def read(self, name: str, device: torch.device) -> torch.Tensor:
        """Parameter ``name`` in fp32 on ``device`` (float8, fp16 and bf16 upcast), checked
        finite: a NaN is refused naming the model and the tensor, never merged or written."""
        if name in self.text:
            value = self.text[name].read().to(device=device, dtype=torch.float32)
        else:
            f, key = self._unet[name]
            value = f.get_tensor(key).to(device=device, dtype=torch.float32)
        if first_non_finite([(name, value)]):
            raise CheckpointError(
                f"{self.where}: {self.reference!r}: tensor {name} holds a non-finite value "
                "(NaN or infinity)"
            )
        return value

    def bakeable(self) -> dict[str, tuple[int, ...]]:
        """The shapes of the weights a LoRA may change, by ``names.lora_name``."""
        shapes = {"unet." + n: self.shape(n) for n in self._unet}
        shapes.update({n: t.shape() for n, t in self.text.items()})
        return shapes


def single_file_layout(model: ModelFiles) -> list[tuple[str, tuple[str, ...], str]]:
    """Where ``model``'s U-Net and text-encoder parameters go in a single file of its
    architecture: (name there, the parameters it is assembled from, ``ldm_format`` op), U-Net
    first. Its ``parts`` follow them in the file."""
    ldm_names = ldm_format.unet_name_map(model.config)
    layout = [(ldm_format.UNET_PREFIX + ldm_names[n], (n,), "copy") for n in model.names("unet")]
    xl = len(model.components()) > 2
    for c, (prefix, open_clip) in ldm_format.text_prefixes(xl).items():
        inner = [n.partition(".")[2] for n in model.names(c)]
        for e in ldm_format.text_layout(inner, prefix, open_clip):
            layout.append((e.name, tuple(f"{c}.{k}" for k in e.sources), e.op))
    return layout


def _single_file_text(f, key: str) -> dict[str, TextSource]:
    """The text-encoder parameters that tensor ``key`` of a single file holds, by
    ``names.merge_name``: one for the transformers layout (SD 1.x, SDXL's first encoder), up to
    three for SDXL's OpenCLIP encoder, whose layers fuse q, k and v; none for other tensors and
    buffers (position ids, ``logit_scale``)."""
    if key.endswith(".position_ids"):
        return {}
    for prefix in (ldm_format.TEXT_PREFIX, ldm_format.XL_TEXT_PREFIX):
        if key.startswith(prefix):
            return {merge_name("text_encoder", key[len(prefix) :]): TextSource(f, key)}
    if key.startswith(ldm_format.XL_TEXT_2_PREFIX):
        found = ldm_format.open_clip_sources(key[len(ldm_format.XL_TEXT_2_PREFIX) :])
        if found:
            names, op = found
            return {
                merge_name("text_encoder_2", n): TextSource(f, key, op, j, len(names))
                for j, n in enumerate(names)
            }
    return {}


def _single_file_part(f, key: str) -> Part:
    """A tensor of a single-file input other than the U-Net and text-encoder parameters, written
    as it is. The VAE's mid-block attention is normalised to 1×1 convolutions (some files store
    it Linear)."""
    is_vae_attention = key.startswith(ldm_format.VAE_PREFIX) and ".mid.attn_1." in key
    return Part(key, ((f, key),), "conv" if is_vae_attention else "copy")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path} ({e.__class__.__name__})") from None


def _open_all(folder: Path, stem: str, stack: ExitStack, where: str) -> dict:
    """Tensors of a diffusers component folder (one file or a sharded index) → (handle, key)."""
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({folder / v for v in _read_json(index)["weight_map"].values()})
    else:
        raise CheckpointError(
            f"{where}: no {stem}.safetensors in {folder} (export reads safetensors)"
        )
    out = {}
    for path in files:
        f = stack.enter_context(safe_open(str(path), framework="pt"))
        for key in f.keys():  # noqa: SIM118 - a safe_open handle is not a dict
            out[key] = (f, key)
    return out


def _dtype(code: str) -> torch.dtype:
    if code in ("F8_E4M3", "F8_E5M2"):
        return torch.float32  # float8 checkpoints are upcast on load
    reverse = {v: k for k, v in CODES.items()}
    if code not in reverse:
        raise CheckpointError(f"unsupported tensor dtype {code} in an input file")
    return reverse[code]
