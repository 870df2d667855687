"""Weights checked once, on load: a ``.safetensors`` header read and checked entry by entry before
any tensor is (duplicate names, dtype and shape against the byte ranges, ranges that overlap or
leave gaps, a file shorter or longer than its header says, no tensors at all), every loaded
tensor finite, and, when a single file did not load, its U-Net against the shapes its
architecture needs, to name the tensor that does not fit.

The finiteness check is one fused reduction over every tensor where the weights already are (on
the GPU after the transfer): a norm is finite exactly when every entry is, unless finite values
overflow it, so tensors are scanned element by element only when it is not, and only then are
the files read again to name the first bad tensor as the file names it. Its cost is a small
fraction of loading (``bench/weight_check.py``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch

ITEM_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
MAX_HEADER = 100 * 2**20  # safetensors' own limit


class WeightsError(ValueError):
    """A weights file that must not be loaded: ``path`` and ``reason``, which names the first
    bad tensor."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def check_header(path: str | os.PathLike) -> dict[str, dict]:
    """The tensors ``path``'s header declares (name → dtype, shape, data_offsets), after
    checking that the header describes the file exactly. ``WeightsError`` otherwise."""
    path = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(path, "is not a .safetensors file (shorter than its header)")
        n = int.from_bytes(head, "little")
        if n == 0 or n > MAX_HEADER or 8 + n > size:
            raise WeightsError(
                path,
                f"is not a .safetensors file (its header length {n} does not fit a "
                f"file of {size} bytes; truncated, or not safetensors)",
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(path, f"its header is not JSON ({e.__class__.__name__})") from None
    except KeyError as e:
        raise WeightsError(path, f"its header names tensor {e.args[0]} twice") from None
    if not isinstance(header, dict):
        raise WeightsError(path, "its header is not a JSON object")
    header.pop("__metadata__", None)
    if not header:
        raise WeightsError(path, "holds no tensors (only metadata)")
    body = size - 8 - n
    spans = []
    for name, entry in header.items():
        spans.append((*_span(path, name, entry), name))
    spans.sort()
    end = 0
    for begin, stop, name in spans:
        if begin != end:
            raise WeightsError(
                path,
                f"tensor {name} starts at byte {begin} of the data, not {end} "
                "(overlapping or missing data)",
            )
        end = stop
    if end != body:
        raise WeightsError(
            path,
            f"its header describes {end} bytes of data, the file holds {body} "
            f"({'truncated' if body < end else 'trailing bytes'})",
        )
    return header


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise KeyError(key)
        out[key] = value
    return out


def _span(path: str, name: str, entry: object) -> tuple[int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise WeightsError(path, f"tensor {name} has a malformed header entry")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ITEM_BYTES:
        raise WeightsError(path, f"tensor {name} has an unknown dtype {dtype!r}")
    valid_shape = isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
    valid_offsets = (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and o >= 0 for o in offsets)
    )
    if not valid_shape or not valid_offsets:
        raise WeightsError(path, f"tensor {name} has a malformed shape or data range")
    begin, stop = offsets
    if stop - begin != math.prod(shape) * ITEM_BYTES[dtype]:
        raise WeightsError(path, f"tensor {name} is {dtype} {shape} but spans {stop - begin} bytes")
    return begin, stop


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding NaN or ±infinity, or None.

    One fused reduction over all of them where they lie (``get_total_norm`` with ``foreach``:
    the norm of norms is finite exactly when every entry is, unless finite values overflow it);
    an element-wise scan, tensor by tensor, only when it is not."""
    floats = [(n, t) for n, t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return None
    values = [t.detach() if t.element_size() > 1 else t.detach().float() for _, t in floats]
    try:  # float8 has no norm kernels: upcast (only files hold it, one tensor at a time)
        total = torch.nn.utils.get_total_norm(values, foreach=True)
    except RuntimeError:  # a device without fused multi-tensor kernels
        total = torch.nn.utils.get_total_norm(values)
    if bool(torch.isfinite(total)):
        return None
    bad = (n for (n, _), t in zip(floats, values, strict=True) if not bool(torch.isfinite(t).all()))
    return next(bad, None)


def non_finite_in_files(files: Iterable[Path]) -> tuple[str, str] | None:
    """(file, tensor) of the first non-finite tensor in ``files`` (in file order), or None."""
    from safetensors import safe_open

    for path in files:
        header = check_header(path)
        order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
        with safe_open(str(path), framework="pt") as f:
            found = first_non_finite((k, f.get_tensor(k)) for k in order)
        if found:
            return str(path), found
    return None


def check_pipeline(pipe, files: Iterable[Path]) -> None:
    """Every parameter and buffer of ``pipe``'s models finite, or a ``WeightsError`` naming the
    first bad tensor as ``files`` (the pipeline's weight files) name it."""
    named = (
        (f"{component}.{name}", tensor)
        for component, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        for name, tensor in module.state_dict().items()
    )
    loaded = first_non_finite(named)
    if loaded is None:
        return
    found = non_finite_in_files(files)
    if found:
        raise WeightsError(found[0], f"tensor {found[1]} holds a non-finite value (NaN or inf)")
    raise WeightsError(
        "the model",
        f"tensor {loaded} is not finite once loaded: a value overflows the dtype it was loaded "
        "in (load it in fp32 or bf16)",
    )


def weight_files(location: str) -> list[Path]:
    """A model's ``.safetensors`` files: the single file, or every component's in a folder
    (none for an allowed pickle file)."""
    path = Path(location)
    if path.is_file():
        return [path] if path.suffix == ".safetensors" else []
    return sorted(path.glob("*/*.safetensors"))


def check_unet_shapes(path: str, header: dict[str, dict], config: dict) -> None:
    """Every U-Net tensor of single file ``path`` has the shape the U-Net that ``config``
    describes needs (its element count and output dimension: LDM files store some 1×1
    convolutions as matrices). ``WeightsError`` naming the first that does not."""
    from diffusers import UNet2DConditionModel

    from composer.checkpoints.ldm_format import UNET_PREFIX, _map_key, unet_prefix_map

    with torch.device("meta"):
        expected = UNet2DConditionModel.from_config(config).state_dict()
    prefixes = unet_prefix_map(config)
    for diffusers_name in expected:
        ldm_name = _map_key(diffusers_name, prefixes)
        entry = header.get(UNET_PREFIX + ldm_name)
        if entry is None:
            continue
        shape, want = tuple(entry["shape"]), tuple(expected[diffusers_name].shape)
        if math.prod(shape) != math.prod(want) or shape[:1] != want[:1]:
            raise WeightsError(
                path,
                f"tensor {UNET_PREFIX + ldm_name} is {list(shape)}, the U-Net of this "
                f"architecture needs {list(want)}",
            )
