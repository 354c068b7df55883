"""Which dtype a recipe's autocast trains in: bfloat16 only where the device multiplies it natively.

A CPU without bfloat16 arithmetic (x86 before AVX-512, e.g. AVX2-only EPYC and Xeon parts) runs a
bfloat16 matmul through conversions, about ten times slower than float32, so ``bf16`` there is a
slowdown, not a speed-up; ``auto`` picks bfloat16 where it pays and float32 elsewhere.
"""

from __future__ import annotations

import warnings

import torch

AUTOCAST_CHOICES = ("auto", "bf16", "none")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (not through float32 emulation).

    Example:
        >>> isinstance(native_bf16("cpu"), bool)
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # oneDNN's own check: AVX-512 (core) or AVX2 with bf16 conversion, or Arm's bf16.
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def autocast_dtype(choice: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of a recipe's ``autocast`` setting on ``device`` (None: float32).

    ``auto`` is bfloat16 where :func:`native_bf16` holds, else float32; ``bf16`` is bfloat16
    everywhere, with a warning where the device would emulate it.

    Example:
        >>> autocast_dtype("none", "cpu") is None
        True
        >>> autocast_dtype("auto", "cpu") in (None, torch.bfloat16)
        True
    """
    if choice not in AUTOCAST_CHOICES:
        raise ValueError(f"autocast must be one of {list(AUTOCAST_CHOICES)}, got {choice!r}")
    if choice == "none":
        return None
    native = native_bf16(device)
    if choice == "bf16" and not native:
        warnings.warn(
            f"autocast: bf16 on a {torch.device(device).type} without native bfloat16 matmuls: "
            "they are emulated, about ten times slower than float32 here; set autocast: auto "
            "(float32 on this device) or none",
            stacklevel=2,
        )
    return torch.bfloat16 if choice == "bf16" or native else None
