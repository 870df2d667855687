"""Export a merge to one single-file ``.safetensors`` checkpoint, streaming tensor by tensor.

    python -m composer merge RECIPE.json --out merged.safetensors [--dtype fp16|bf16|fp32]
    python -m composer lora bake MODEL LORA[:strength] ... --out baked.safetensors

Every input is opened with ``safe_open`` (memory-mapped) and read one parameter at a time; the
output is written by ``StreamingWriter`` one tensor at a time, so peak RAM is a few tensors, not a
model. Architectures and shapes (LoRAs' included) are checked before any work. The merge is
computed in fp32 (on the GPU when there is one) and written in the asked dtype, in the original
Stable Diffusion layout (``composer.checkpoints.ldm_format``: SD 1.x or SDXL). U-Net and text
encoder(s) are merged, parameter by parameter under their diffusers names as the live merge does
(an SDXL single file's fused OpenCLIP q/k/v is taken apart first, so both give the same
weights); the VAE is the first expert's. An expert's LoRAs are baked into its weights as each tensor is read: ΔW
is computed from the LoRA file for exactly the tensor being written. ``__metadata__`` holds the
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

from composer import registry
from composer.checkpoints import ldm_format
from composer.merge import lora
from composer.merge.blocks import weight_map
from composer.merge.plan import (
    check_compatible,
    check_settings,
    merge_name,
    merge_parameter,
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
    parameters by ``plan.merge_name``, and the other tensors (VAE, buffers) as ``Part``s of the
    single-file layout."""

    def __init__(self, source: registry.Source, where: str, stack: ExitStack):
        self.source = source
        self.text: dict[str, TextSource] = {}
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
            self.parts = []
            for key in sorted(k for k in keys if not k.startswith(prefix)):
                sources = _single_file_text(f, key)
                if sources:
                    self.text.update(sources)
                else:
                    self.parts.append(_single_file_part(f, key))
            return
        folder = Path(source.location)
        self.config_folder = source.reference if source.kind == "bundled" else str(folder)
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
                raise RecipeError(
                    f"{where}: {source.reference!r} has a {component} tensor that the single-file "
                    f"layout has no name for ({e})"
                ) from None
            for key, (f, k) in files.items():
                if key.endswith(".position_ids"):
                    if not open_clip:  # a buffer, kept as the first expert has it
                        name = prefix + ldm_format.clip_inner(key)
                        self.parts.append(Part(name, ((f, k),)))
                    continue
                self.text[merge_name(component, key)] = TextSource(f, k)

    def unet_names(self) -> list[str]:
        return list(self._unet)

    def shape(self, name: str) -> tuple[int, ...]:
        f, key = self._unet[name]
        return tuple(f.get_slice(key).get_shape())

    def unet(self, name: str, device: torch.device) -> torch.Tensor:
        f, key = self._unet[name]
        return f.get_tensor(key).to(device=device, dtype=torch.float32)

    def text_names(self, component: str) -> list[str]:
        return [n for n in self.text if n.partition(".")[0] == component]

    def text_tensor(self, name: str, device: torch.device) -> torch.Tensor:
        return self.text[name].read().to(device=device, dtype=torch.float32)

    def components(self) -> list[str]:
        """The text encoders this model has (``text_encoder``, ``text_encoder_2``)."""
        return sorted({n.partition(".")[0] for n in self.text})

    def bakeable(self) -> dict[str, tuple[int, ...]]:
        """The shapes of the weights a LoRA may change, by ``lora.Layers`` name."""
        shapes = {"unet." + n: self.shape(n) for n in self._unet}
        shapes.update({n: t.shape() for n, t in self.text.items()})
        return shapes


def _single_file_text(f, key: str) -> dict[str, TextSource]:
    """The text-encoder parameters that tensor ``key`` of a single file holds, by
    ``plan.merge_name``: one for the transformers layout (SD 1.x, SDXL's first encoder), up to
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
    into that expert's weights (U-Net and text encoders) as each tensor is read (``lora.baked``).
    Returns what was done."""
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
        first = experts[0]
        check_compatible(
            [(m.source.reference, {n: m.shape(n) for n in m.unet_names()}) for m in models]
        )
        components = first.components()
        for component in components:
            check_compatible(
                [
                    (m.source.reference, {n: m.text[n].shape() for n in m.text_names(component)})
                    for m in models
                ],
                component,
            )
        loras = [_lora_files(e, i) for i, e in enumerate(recipe.experts)]
        layers = [
            lora.bake_plan(loras[i], m.bakeable(), m.source.reference)
            for i, m in enumerate(experts)
        ]
        try:
            block_weight = weight_map(first.config, settings.block_weights, settings.overrides)
        except ValueError as e:
            raise RecipeError(f"merge.block_weights: {e}") from None
        names = first.unet_names()
        ldm_names = ldm_format.unet_name_map(first.config)
        weights = [e.weight for e in recipe.experts]

        def expert(i: int, n: str) -> torch.Tensor:
            if n in experts[i].text:
                return lora.baked(experts[i].text_tensor(n, dev), layers[i].get(n, ()))
            return lora.baked(experts[i].unet(n, dev), layers[i].get("unet." + n, ()))

        def reference(n: str) -> torch.Tensor:
            return base.text_tensor(n, dev) if n in base.text else base.unet(n, dev)

        groups = {"unet": names, **{c: first.text_names(c) for c in components}}
        thresholds = dict.fromkeys(groups)
        if settings.method in ("ties", "consensus") and settings.trim_scope == "model":
            for c, group in groups.items():
                thresholds[c] = whole_model_thresholds(
                    group, lambda n, i: expert(i, n) - reference(n), len(experts), settings.density
                )

        def merged(c: str, n: str) -> torch.Tensor:
            if recipe.method == "single":
                return expert(0, n)
            return merge_parameter(
                settings,
                n,
                reference(n) if base else None,
                [expert(i, n) for i in range(len(experts))],
                weights,
                block_weight(n),
                thresholds[c],
                shortcut=c != "unet",
            )

        def out_dtype(source_dtype: torch.dtype) -> torch.dtype:
            return target if source_dtype.is_floating_point else source_dtype

        text_entries = [
            (c, entry)
            for c, (prefix, open_clip) in ldm_format.text_prefixes(len(components) > 1).items()
            for entry in ldm_format.text_layout(
                [n.partition(".")[2] for n in first.text_names(c)], prefix, open_clip
            )
        ]
        entries = [(ldm_format.UNET_PREFIX + ldm_names[n], target, first.shape(n)) for n in names]
        entries += [
            (e.name, target,
             ldm_format.assembled_shape(e.op, [first.text[f"{c}.{k}"].shape() for k in e.sources]))
            for c, e in text_entries
        ]  # fmt: skip
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
                    value = merged("unet", n)
                    writer.write(ldm_format.UNET_PREFIX + ldm_names[n], value.to(target))
                for c, e in text_entries:
                    value = ldm_format.assemble(e.op, [merged(c, f"{c}.{k}") for k in e.sources])
                    writer.write(e.name, value.to(target))
                for part in first.parts:
                    writer.write(part.name, part.read().to(out_dtype(part.dtype())))
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
