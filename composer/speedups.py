"""GPU speed switches, all off by default (issue 18, item 5).

Each is an environment variable read when a model is loaded (``prepare``) or a batch is sampled
(``attention``), so that the recipe, and what a PNG or link remakes, does not depend on them:

- ``COMPOSER_COMPILE=default|reduce-overhead|max-autotune|max-autotune-no-cudagraphs``:
  ``torch.compile`` of every U-Net's forward, in place (``Module.compile``: the module, its
  parameters and ``state_dict`` keys stay as they are, so merges and LoRAs still find them; a
  LoRA attached later, or a new batch size or image size, recompiles). AFA runs its experts'
  U-Nets block by block (``pipelines.aggregation.walker``), so compiling the forward does not
  reach it.
- ``COMPOSER_CHANNELS_LAST=1``: U-Net and VAE weights in channels-last memory format, which
  cuDNN's convolutions prefer in fp16 on tensor cores.
- ``COMPOSER_SDPA=flash|efficient|cudnn|math``: the scaled-dot-product attention kernel that
  diffusers' default attention processor (``AttnProcessor2_0``, which calls
  ``F.scaled_dot_product_attention``) may use; unset, PyTorch picks per call.
- ``COMPOSER_STREAMS=1``: in a superposition, experts whose U-Nets differ are evaluated on
  their own CUDA streams, so that two small U-Nets can overlap.

They can change results by float rounding (compiled kernels fuse differently), which is why they
are off unless asked for. ``bench/gpu.sh engine`` measures each against plain diffusers on
SD1.5-shaped random weights at 512² (``bench.gpu_switches``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SDPA_KERNELS = ("flash", "efficient", "cudnn", "math")
_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False, "": False}


@dataclass(frozen=True)
class Speedups:
    compile: str | None = None
    channels_last: bool = False
    sdpa: str | None = None
    streams: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Speedups:
        """The switches set in ``environ`` (default: ``os.environ``); a value outside what is
        accepted is a ``ValueError`` that names the variable and the accepted values."""
        env = os.environ if environ is None else environ
        return cls(
            compile=_choice(env, "COMPOSER_COMPILE", COMPILE_MODES),
            channels_last=_flag(env, "COMPOSER_CHANNELS_LAST"),
            sdpa=_choice(env, "COMPOSER_SDPA", SDPA_KERNELS),
            streams=_flag(env, "COMPOSER_STREAMS"),
        )


def _choice(env: Mapping[str, str], name: str, accepted: tuple[str, ...]) -> str | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not accepted; use one of {', '.join(accepted)}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value not in _FLAGS:
        raise ValueError(f"{name}={value!r} is not accepted; use 1 or 0")
    return _FLAGS[value]


def prepare(pipe, speedups: Speedups) -> None:
    """Apply the load-time switches to a loaded pipeline's U-Net (and VAE), in place."""
    if speedups.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        if getattr(pipe, "vae", None) is not None:
            pipe.vae.to(memory_format=torch.channels_last)
    if speedups.compile is not None:
        pipe.unet.compile(mode=speedups.compile)


@contextlib.contextmanager
def attention(speedups: Speedups) -> Iterator[None]:
    """Within it, attention uses only the kernel ``speedups.sdpa`` names (if any)."""
    if speedups.sdpa is None:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[speedups.sdpa]
    with sdpa_kernel(backend):
        yield
