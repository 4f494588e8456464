"""Tolerance helpers shared by the tests (STYLE.md): relative error, "kernel error <= 2x torch's own error in the
same dtype", and SQNR in dB for quantization."""

from __future__ import annotations

import math

import torch

__all__ = ["rel_err", "assert_close_to_ref", "sqnr_db", "assert_rel_err"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN if either holds a NaN)."""
    out, ref = out.detach().double(), ref.detach().double()
    if torch.isnan(out).any() or torch.isnan(ref).any():
        return math.nan
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel_err(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"  # NaN fails too


def assert_close_to_ref(out: torch.Tensor, torch_out: torch.Tensor, exact: torch.Tensor, factor: float = 2.0,
                        floor: float = 1e-6, what: str = "output") -> None:
    """The flash-attention rule: `out` (our kernel, low precision) may be at most `factor` times as far from
    `exact` (fp32/fp64 reference) as `torch_out` (torch's own computation in the same low precision), plus a tiny
    floor so that an exact torch result does not demand an exact kernel."""
    ours, theirs = rel_err(out, exact), rel_err(torch_out, exact)
    assert ours <= factor * theirs + floor, f"{what}: error {ours:.3g} > {factor} x torch's {theirs:.3g} + {floor:g}"


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(||ref||^2 / ||out - ref||^2) in dB."""
    out, ref = out.detach().double(), ref.detach().double()
    noise = (out - ref).pow(2).sum().item()
    return math.inf if noise == 0 else 10.0 * math.log10(ref.pow(2).sum().item() / noise)
