"""Where tensors live: device choice, the dtypes each device supports, seeded blocks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA if available, else Apple MPS, else CPU.

    A device that does not exist here is refused with a ``ValueError`` naming what does
    (torch itself would fail later, at the first tensor moved, with an ``AssertionError``
    about how it was compiled).
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    choices = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be one of {choices}, got {device!r}.") from None
    if dev.type not in ("cpu", "cuda", "mps"):  # e.g. "meta": tensors without values
        raise ValueError(f"device must be one of {choices}, got {device!r}.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but torch {torch.__version__} sees no CUDA GPU "
                         "here (a CPU build, or no driver); use device='auto' or 'cpu'.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}, but only {torch.cuda.device_count()} CUDA "
                         "device(s) exist here.")
    if dev.type == "mps" and not _mps_available():
        raise ValueError(f"device={device!r}, but Apple MPS is not available here; use "
                         "device='auto' or 'cpu'.")
    return dev


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for epoch sums (exact over millions of cells); float32 on MPS, which lacks float64."""
    return torch.float32 if device.type == "mps" else torch.float64


@contextlib.contextmanager
def rng_kept(device: torch.device) -> Iterator[None]:
    """Run the block, then give torch's global random state back (the CPU's and
    ``device``'s): scoring held-out cells draws z, and must not change what training or
    the caller draws next."""
    cuda = ([torch.cuda.current_device() if device.index is None else device.index]
            if device.type == "cuda" else [])
    mps_state = torch.mps.get_rng_state() if device.type == "mps" else None
    with torch.random.fork_rng(devices=cuda):  # fork_rng gives back the CPU's and CUDA's
        try:
            yield
        finally:
            if mps_state is not None:
                torch.mps.set_rng_state(mps_state)


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's global generators (the CPU's and ``device``'s) for the block, and give
    the caller's random state back after it; ``seed=None``: leave them alone."""
    if seed is None:
        yield
        return
    with rng_kept(device):
        seed_generators(seed, device)
        yield


def seed_generators(seed: int, device: torch.device) -> None:
    """Seed the CPU's generator and ``device``'s. Not ``torch.manual_seed``: it would also
    reset every other GPU's, which :func:`rng_kept` does not give back."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[
            torch.cuda.current_device() if device.index is None else device.index
        ].manual_seed(seed)
    if device.type == "mps":
        torch.mps.manual_seed(seed)
