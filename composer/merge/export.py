"""Export a merge to one single-file ``.safetensors`` checkpoint, streaming tensor by tensor.

    python -m composer merge RECIPE.json --out merged.safetensors [--dtype fp16|bf16|fp32]
    python -m composer lora bake MODEL LORA[:strength] ... --out baked.safetensors

Every input is opened with ``safe_open`` (memory-mapped) and read one parameter at a time; the
output is written by ``StreamingWriter`` one tensor at a time, so peak RAM is a few tensors, not a
model. Architectures and shapes (LoRAs' included) are checked before any work. The merge is
computed in fp32 (on the GPU when there is one) and written in the asked dtype, in the original
Stable Diffusion layout (``composer.ldm_format``: SD 1.x or SDXL), with the first expert's VAE and
text encoder(s). An expert's LoRAs are baked into its weights as each tensor is read: ΔW is
computed from the LoRA file for exactly the tensor being written. ``__metadata__`` holds the
recipe, the sha256 of each input (U-Net weights, LoRA files) and the config folder that lets the
registry load the file back offline.

Why our own writer: ``safetensors.torch.save_file`` needs every tensor in memory at once.
The format is an 8-byte little-endian header length, a JSON header (dtype, shape and byte range
of every tensor, and ``__metadata__``), then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from composer import ldm_format, registry
from composer.merge import lora
from composer.merge.blocks import weight_map
from composer.merge.plan import (
    check_compatible,
    check_settings,
    merge_tensor,
    whole_model_thresholds,
)
from composer.recipe import Merge, Recipe, RecipeError, looks_like_hub_id

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_CODES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
RECIPE_KEY = "composer_recipe"
INPUTS_KEY = "composer_inputs"


class StreamingWriter:
    """Write a safetensors file whose tensors are known by (name, dtype, shape) in advance and
    arrive one at a time, in that order. The file appears at ``path`` only when complete."""

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple]], meta):
        self.path = Path(path)
        self.entries = entries
        header, offset = {}, 0
        for name, dtype, shape in entries:
            size = torch.empty((), dtype=dtype).element_size()
            for d in shape:
                size *= int(d)
            header[name] = {
                "dtype": _CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        header["__metadata__"] = {k: str(v) for k, v in meta.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._file.write(len(blob).to_bytes(8, "little") + blob)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, dtype, shape = self.entries[self._next]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"writer expected {expected} {dtype} {shape}, got {name}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.entries):
            self.abort()
            raise RuntimeError(f"{len(self.entries) - self._next} tensors were not written")
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class Part:
    """One tensor of the output file other than the U-Net's: its name in the single-file layout,
    its source tensors ((handle, key) each), the parameter name (``lora.Layers`` spelling) of
    each source that a LoRA may change, or None, and the ``ldm_format.assemble`` op."""

    name: str
    inputs: tuple[tuple[object, str], ...]
    params: tuple[str | None, ...]
    op: str = "copy"

    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(f.get_slice(key).get_shape()) for f, key in self.inputs]

    def shape(self) -> tuple[int, ...]:
        return ldm_format.assembled_shape(self.op, self.shapes())

    def dtype(self) -> torch.dtype:
        f, key = self.inputs[0]
        return _dtype(f.get_slice(key).get_dtype())

    def read(self, layers: lora.Layers, device: torch.device) -> torch.Tensor:
        """The tensor, with the LoRA layers of ``layers`` that change its sources baked in."""
        tensors = []
        for (f, key), param in zip(self.inputs, self.params, strict=True):
            value = f.get_tensor(key)
            if param in layers:
                value = lora.baked(value.to(device), layers[param])
            tensors.append(value)
        return ldm_format.assemble(self.op, tensors)


class ModelFiles:
    """One model's weights as memory-mapped files: U-Net tensors by diffusers name, and the
    other tensors (VAE, text encoders) as ``Part``s of the single-file layout."""

    def __init__(self, source: registry.Source, where: str, stack: ExitStack):
        self.source = source
        if source.kind == "hub":
            raise RecipeError(
                f"{where}: {source.reference!r} is a Hub id; export needs local files (download "
                "it, or merge live on the page)"
            )
        if source.kind == "single_file":
            if not source.location.endswith(".safetensors"):
                raise RecipeError(f"{where}: export reads .safetensors files only")
            config_folder = registry.single_file_config(source)
            if config_folder is None:
                raise RecipeError(
                    f"{where}: {source.reference!r} names no config folder; set "
                    "COMPOSER_SINGLE_FILE_CONFIG to a diffusers folder of its architecture"
                )
            self.config_folder = config_folder
            self.unet_file = Path(source.location)
            f = stack.enter_context(safe_open(source.location, framework="pt"))
            self.config = _read_json(Path(config_folder) / "unet" / "config.json")
            names = ldm_format.unet_name_map(self.config)  # diffusers → LDM
            keys = set(f.keys())
            prefix = ldm_format.UNET_PREFIX
            self._unet = {d: (f, prefix + k) for d, k in names.items() if prefix + k in keys}
            if len(self._unet) != len(names):
                raise RecipeError(
                    f"{where}: {source.reference!r} does not hold the U-Net its config "
                    f"({config_folder}) describes"
                )
            self.parts = [_single_file_part(f, k) for k in sorted(keys) if not k.startswith(prefix)]
            return
        folder = Path(source.location)
        self.config_folder = source.reference if source.kind == "bundled" else str(folder)
        self.config = _read_json(folder / "unet" / "config.json")
        self.unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
        self._unet = _open_all(folder / "unet", "diffusion_pytorch_model", stack, where)
        vae = _open_all(folder / "vae", "diffusion_pytorch_model", stack, where)
        layouts = {"vae": ldm_format.vae_layout(vae, _read_json(folder / "vae" / "config.json"))}
        files = {"vae": vae}
        xl = (folder / "text_encoder_2").is_dir()
        for component, (prefix, open_clip) in ldm_format.text_prefixes(xl).items():
            files[component] = _open_all(folder / component, "model", stack, where)
            try:
                layouts[component] = ldm_format.text_layout(files[component], prefix, open_clip)
            except KeyError as e:
                raise RecipeError(
                    f"{where}: {source.reference!r} has a {component} tensor that the single-file "
                    f"layout has no name for ({e})"
                ) from None
        self.parts = [
            Part(
                entry.name,
                tuple(files[component][k] for k in entry.sources),
                tuple(_param(component, k) for k in entry.sources),
                entry.op,
            )
            for component, layout in layouts.items()
            for entry in layout
        ]

    def unet_names(self) -> list[str]:
        return list(self._unet)

    def shape(self, name: str) -> tuple[int, ...]:
        f, key = self._unet[name]
        return tuple(f.get_slice(key).get_shape())

    def unet(self, name: str, device: torch.device) -> torch.Tensor:
        f, key = self._unet[name]
        return f.get_tensor(key).to(device=device, dtype=torch.float32)

    def bakeable(self) -> dict[str, tuple[int, ...]]:
        """The shapes of the weights a LoRA may change, by ``lora.Layers`` name."""
        shapes = {"unet." + n: self.shape(n) for n in self._unet}
        for part in self.parts:
            for param, shape in zip(part.params, part.shapes(), strict=True):
                if param is not None:
                    shapes[param] = shape
        return shapes


def _param(component: str, key: str) -> str:
    return f"{component}.{ldm_format.clip_inner(key)}" if component != "vae" else f"vae.{key}"


def _single_file_part(f, key: str) -> Part:
    """A non-U-Net tensor of a single-file input, written as it is. Its CLIP text encoder's
    weights (SD 1.x's, SDXL's first) keep diffusers' names under a prefix, so LoRAs can be baked
    into them; SDXL's OpenCLIP encoder fuses q, k and v, so it cannot take LoRA layers here. The
    VAE's mid-block attention is normalised to 1×1 convolutions (some files store it Linear)."""
    param = None
    for prefix in (ldm_format.TEXT_PREFIX, ldm_format.XL_TEXT_PREFIX):
        if key.startswith(prefix):
            param = "text_encoder." + key[len(prefix) :]
    is_vae_attention = key.startswith(ldm_format.VAE_PREFIX) and ".mid.attn_1." in key
    return Part(key, ((f, key),), (param,), "conv" if is_vae_attention else "copy")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RecipeError(f"cannot read {path} ({e.__class__.__name__})") from None


def _open_all(folder: Path, stem: str, stack: ExitStack, where: str) -> dict:
    """Tensors of a diffusers component folder (one file or a sharded index) → (handle, key)."""
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({folder / v for v in _read_json(index)["weight_map"].values()})
    else:
        raise RecipeError(f"{where}: no {stem}.safetensors in {folder} (export reads safetensors)")
    out = {}
    for path in files:
        f = stack.enter_context(safe_open(str(path), framework="pt"))
        for key in f.keys():  # noqa: SIM118 - a safe_open handle is not a dict
            out[key] = (f, key)
    return out


def export(recipe: Recipe, out: str | Path, dtype: str = "fp16", device: str | None = None) -> dict:
    """Stream ``recipe`` into ``out``: the merge of its experts (``method: merge``), or its one
    expert (``method: single``, what ``composer lora bake`` writes). Each expert's LoRAs are baked
    into that expert's weights as each tensor is read (``lora.baked``); the file's text encoders
    are the first expert's, with its LoRAs' text-encoder layers. Returns what was done."""
    if recipe.method not in ("merge", "single"):
        raise RecipeError(
            f"method: {recipe.method!r} is not accepted; export needs 'merge', or 'single' to bake "
            "an expert's LoRAs into its model"
        )
    settings = (recipe.merge or Merge()) if recipe.method == "merge" else Merge()
    check_settings(settings, len(recipe.experts), settings.base is not None)
    target = DTYPES[dtype]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    with ExitStack() as stack:
        experts = [
            ModelFiles(
                registry.resolve_model(e.model, f"experts[{i}].model"), f"experts[{i}].model", stack
            )
            for i, e in enumerate(recipe.experts)
        ]
        base = (
            ModelFiles(registry.resolve_model(settings.base, "merge.base"), "merge.base", stack)
            if settings.base
            else None
        )
        models = [*experts, *([base] if base else [])]
        check_compatible(
            [(m.source.reference, {n: m.shape(n) for n in m.unet_names()}) for m in models]
        )
        loras = [_lora_files(e, i) for i, e in enumerate(recipe.experts)]
        layers = [
            lora.bake_plan(
                loras[i], m.bakeable(), m.source.reference, () if i == 0 else lora.TEXT_ENCODERS
            )
            for i, m in enumerate(experts)
        ]
        first = experts[0]
        try:
            block_weight = weight_map(first.config, settings.block_weights, settings.overrides)
        except ValueError as e:
            raise RecipeError(f"merge.block_weights: {e}") from None
        names = first.unet_names()
        ldm_names = ldm_format.unet_name_map(first.config)
        weights = [e.weight for e in recipe.experts]

        def expert(i: int, n: str) -> torch.Tensor:
            return lora.baked(experts[i].unet(n, dev), layers[i].get("unet." + n, ()))

        thresholds = None
        if settings.method in ("ties", "consensus") and settings.trim_scope == "model":
            thresholds = whole_model_thresholds(
                names, lambda n, i: expert(i, n) - base.unet(n, dev), len(experts), settings.density
            )

        def out_dtype(source_dtype: torch.dtype) -> torch.dtype:
            return target if source_dtype.is_floating_point else source_dtype

        entries = [(ldm_format.UNET_PREFIX + ldm_names[n], target, first.shape(n)) for n in names]
        entries += [(p.name, out_dtype(p.dtype()), p.shape()) for p in first.parts]
        inputs = {m.source.reference: registry.file_sha256(m.unet_file) for m in models}
        inputs.update(
            {
                lo.path: registry.file_sha256(path)
                for e, files in zip(recipe.experts, loras, strict=True)
                for lo, (_, path, _) in zip(e.loras, files, strict=True)
            }
        )
        meta = {
            ldm_format.CONFIG_KEY: first.config_folder,
            RECIPE_KEY: recipe.to_json(),
            INPUTS_KEY: json.dumps(inputs),
        }
        writer = StreamingWriter(out, entries, meta)
        try:
            with torch.no_grad():
                for n in names:
                    if recipe.method == "single":
                        value = expert(0, n)
                    else:
                        value = merge_tensor(
                            settings,
                            n,
                            base.unet(n, dev) if base else None,
                            [expert(i, n) for i in range(len(experts))],
                            weights,
                            block_weight(n),
                            thresholds,
                        )
                    writer.write(ldm_format.UNET_PREFIX + ldm_names[n], value.to(target))
                for part in first.parts:
                    writer.write(part.name, part.read(layers[0], dev).to(out_dtype(part.dtype())))
            writer.close()
        except BaseException:
            writer.abort()
            raise
    return {
        "path": str(out),
        "tensors": len(entries),
        "bytes": Path(out).stat().st_size,
        "dtype": dtype,
        "device": str(dev),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _lora_files(expert, i: int) -> list[tuple[str, str, float]]:
    """An expert's LoRAs as ``lora.bake_plan`` takes them: (recipe field, local file, strength)."""
    files = []
    for j, lo in enumerate(expert.loras):
        where = f"experts[{i}].loras[{j}].path"
        path = registry.resolve_lora(lo.path, where)
        if looks_like_hub_id(path):
            raise RecipeError(
                f"{where}: {lo.path!r} is a Hub id; export needs local files (download it, or "
                "merge live on the page)"
            )
        files.append((where, path, lo.weight))
    return files


def _dtype(code: str) -> torch.dtype:
    reverse = {v: k for k, v in _CODES.items()}
    if code not in reverse:
        raise RecipeError(f"unsupported tensor dtype {code} in an input file")
    return reverse[code]
