"""Scanpy-style plots. Each returns the matplotlib ``Axes`` (or ``Figure``) it drew on."""

from __future__ import annotations

from .plotting import training_history

__all__ = ["training_history"]
