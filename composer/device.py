"""Where the work runs (ARCHITECTURE.md, device policy) and how results and cards name it."""

from __future__ import annotations

import platform

import torch


def pick_device() -> tuple[torch.device, torch.dtype]:
    """CUDA in fp16, else Apple MPS in fp16, else CPU in fp32 (ARCHITECTURE.md, device policy)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    if torch.backends.mps.is_available():
        return torch.device("mps"), torch.float16
    return torch.device("cpu"), torch.float32


def device_name(device: torch.device | None = None) -> str:
    """The GPU's name, else the device kind and its thread count, as training records and bench
    results store it. Without ``device``: this machine's first GPU, else its CPU by processor
    (``"cpu x86_64 (2 threads)"``), the form of every ``bench/results`` file."""
    threads = torch.get_num_threads()
    if device is None:
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
        return f"cpu {platform.processor() or platform.machine()} ({threads} threads)"
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({threads} threads)"
