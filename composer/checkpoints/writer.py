"""A safetensors file written one tensor at a time.

Why our own writer: ``safetensors.torch.save_file`` needs every tensor in memory at once. The
format is an 8-byte little-endian header length, a JSON header (dtype, shape and byte range of
every tensor, and ``__metadata__``), then the tensors' bytes back to back; when the names, dtypes
and shapes are known in advance the header can be written first and each tensor as it arrives.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CODES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
"""The safetensors dtype codes of the dtypes a checkpoint holds."""


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
                "dtype": CODES[dtype],
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
