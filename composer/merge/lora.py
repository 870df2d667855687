r"""LoRA arithmetic: exact sums by concatenation, rank reduction by SVD, TIES/DARE on ΔW, and
extraction of a LoRA from two checkpoints.

A LoRA on a module with weight W (out × in, or out × in × kh × kw for a conv) is a pair
A (r × in[·kh·kw]) and B (out × r) with scale α/r: applied at strength s it adds

    ΔW = s · (α/r) · B · A.

Sum of LoRAs, exactly: Σᵢ sᵢ(αᵢ/rᵢ)·Bᵢ·Aᵢ = [c₁B₁ … c_nB_n] · [A₁; …; A_n] with cᵢ = sᵢαᵢ/rᵢ, one
LoRA of rank Σrᵢ with α = r (scale 1). At a fixed smaller rank k the best approximation in the
Frobenius norm is the truncated SVD of the summed ΔW (Eckart–Young): B = U_k·S_k, A = V_kᵀ.

Files are read with diffusers' ``lora_state_dict`` (kohya, PEFT and diffusers layouts) and written
in the PEFT layout diffusers' ``load_lora_weights`` reads, with the scale folded into B (α = r).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from composer.merge import methods as m


@dataclass
class LoraPair:
    """One module's LoRA: ``down`` (A) and ``up`` (B) with their scale α/r folded in ``scale``."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, strength: float = 1.0) -> torch.Tensor:
        """ΔW = s·scale·B·A, in the module weight's shape (a conv's kernel dims come from A)."""
        up = self.up.reshape(self.up.shape[0], -1).float()
        down = self.down.reshape(self.rank, -1).float()
        dw = strength * self.scale * (up @ down)
        return dw.reshape(self.up.shape[0], *self.down.shape[1:])


def concat(pairs: Sequence[LoraPair], strengths: Sequence[float]) -> LoraPair:
    """Σᵢ sᵢ·ΔWᵢ exactly, as one LoRA of rank Σrᵢ (scale 1)."""
    downs = [p.down.float() for p in pairs]
    ups = [
        (s * p.scale) * p.up.reshape(p.up.shape[0], p.rank, *p.up.shape[2:]).float()
        for p, s in zip(pairs, strengths, strict=True)
    ]
    return LoraPair(torch.cat(downs, dim=0), torch.cat(ups, dim=1), 1.0)


def from_delta(delta: torch.Tensor, rank: int, conv_up_shape: bool = False) -> LoraPair:
    """The rank-``rank`` LoRA closest to ``delta`` (truncated SVD), scale 1."""
    out = delta.shape[0]
    flat = delta.reshape(out, -1).float()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    k = max(1, min(rank, s.numel()))
    up = u[:, :k] * s[:k]
    down = vh[:k]
    if delta.dim() == 4:
        down = down.reshape(k, *delta.shape[1:])
        up = up.reshape(out, k, 1, 1)
    return LoraPair(down.contiguous(), up.contiguous(), 1.0)


def merge_pairs(
    pairs: Sequence[LoraPair],
    strengths: Sequence[float],
    method: str = "concat",
    rank: int | None = None,
    density: float = 0.2,
    seed: int = 0,
    name: str = "",
    sign_rule: str = "mass",
) -> LoraPair:
    """One module's merged LoRA. ``concat``: exact (then SVD-truncated if ``rank`` is below the
    sum of ranks). ``ties`` / ``dare_ties`` / ``dare``: the method applied to the experts' full
    ΔWᵢ over a zero base (TIES trims and elects signs per entry of ΔW, not of A and B, whose
    entries have no meaning alone), then SVD to ``rank`` (default: the largest input rank)."""
    if method == "concat":
        merged = concat(pairs, strengths)
        if rank is None or rank >= merged.rank:
            return merged
        return from_delta(merged.delta(), rank)
    deltas = [p.delta(s) for p, s in zip(pairs, strengths, strict=True)]
    zero = torch.zeros_like(deltas[0])
    if method == "ties":
        delta = m.ties(zero, deltas, density, 1.0, None, sign_rule)
    elif method == "dare_ties":
        delta = m.dare_ties(zero, deltas, density, seed, name, 1.0, None, sign_rule)
    elif method == "dare":
        delta = m.dare_linear(zero, deltas, density, seed, name)
    else:
        raise ValueError(f"LoRA merge method must be concat, ties, dare_ties or dare: {method!r}")
    return from_delta(delta, rank or max(p.rank for p in pairs))


def extract(weight_a: torch.Tensor, weight_b: torch.Tensor, rank: int) -> LoraPair:
    """The rank-``rank`` LoRA that takes checkpoint A's weight closest to checkpoint B's."""
    return from_delta(weight_b.float() - weight_a.float(), rank)


# --- files ------------------------------------------------------------------------------------


def read_lora(path: str) -> dict[str, LoraPair]:
    """A LoRA file (kohya, PEFT or diffusers layout, ``.safetensors``) → module name (with its
    ``unet.``/``text_encoder.`` prefix) → ``LoraPair`` with the file's α/r as ``scale``."""
    from diffusers import StableDiffusionPipeline

    state, alphas = StableDiffusionPipeline.lora_state_dict(path)
    pairs = {}
    for key, down in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        up = state.get(module + ".lora_B.weight")
        if up is None:
            raise ValueError(f"{path}: {module} has lora_A but no lora_B")
        alpha = (alphas or {}).get(module + ".alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        pairs[module] = LoraPair(down, up, scale)
    if not pairs:
        raise ValueError(f"{path}: no LoRA weights found")
    return pairs


def write_lora(
    path: str,
    pairs: dict[str, LoraPair],
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write ``pairs`` in the PEFT layout (scale folded into B, so α = r) that
    ``pipe.load_lora_weights`` reads; ranks may differ between modules."""
    from safetensors.torch import save_file

    state = {}
    for module, p in pairs.items():
        state[f"{module}.lora_A.weight"] = p.down.to(dtype).contiguous()
        state[f"{module}.lora_B.weight"] = (p.up.float() * p.scale).to(dtype).contiguous()
    save_file(state, path, metadata={"format": "pt", **(metadata or {})})


def merge_files(
    paths: Sequence[str],
    strengths: Sequence[float],
    method: str = "concat",
    rank: int | None = None,
    density: float = 0.2,
    seed: int = 0,
) -> dict[str, LoraPair]:
    """Merge LoRA files module by module; a module only some files train is merged with zero
    from the others (its ΔW is 0 there)."""
    loras = [read_lora(p) for p in paths]
    modules = list(dict.fromkeys(k for lora in loras for k in lora))
    out = {}
    for module in modules:
        present = [
            (lora[module], s) for lora, s in zip(loras, strengths, strict=True) if module in lora
        ]
        if method == "concat" or len(present) == 1:
            pairs, weights = zip(*present, strict=True)
            out[module] = merge_pairs(pairs, weights, "concat", rank)
        else:
            shape = present[0][0].delta().shape
            pairs = [
                lora.get(module)
                or LoraPair(
                    torch.zeros(1, *shape[1:]), torch.zeros(shape[0], 1, *[1] * (len(shape) - 2))
                )
                for lora in loras
            ]
            out[module] = merge_pairs(pairs, strengths, method, rank, density, seed, module)
    return out


def extract_models(tuned_files, base_files, rank: int, device: str = "cpu") -> dict[str, LoraPair]:
    """A LoRA that turns the base U-Net toward the tuned one: per Linear/Conv weight (2-D or
    4-D, norms and biases skipped), the rank-``rank`` SVD of θ_tuned − θ_base. The arguments are
    ``composer.merge.export.ModelFiles`` (streamed, one tensor at a time)."""
    out = {}
    for name in tuned_files.unet_names():
        if not name.endswith(".weight"):
            continue
        tuned = tuned_files.unet(name, torch.device(device))
        if tuned.dim() not in (2, 4):
            continue
        delta = tuned - base_files.unet(name, torch.device(device))
        if float(delta.abs().max()) == 0.0:
            continue
        out["unet." + name[: -len(".weight")]] = from_delta(delta, rank)
    return out
