"""Where tensors live: device choice and the dtypes each device supports."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA if available, else Apple MPS, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for epoch sums (exact over millions of cells); float32 on MPS, which lacks float64."""
    return torch.float32 if device.type == "mps" else torch.float64
