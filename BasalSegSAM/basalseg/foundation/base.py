"""The interface every frozen 2D foundation backend implements, and shared slice helpers.

Image and prompt conventions for backends (see :mod:`basalseg.prompts` for where they come from):

* ``set_image(image)`` takes one 2D slice as a float32 array ``(H, W)`` with values in [0, 1]:
  rows are ``y``, columns ``x``. The backend resizes it to its native input size itself and
  encodes it **once**; every ``predict`` after that reuses the embedding. It also takes an
  ``(H, W, 3)`` array, the **3-slice context** (channels = slices ``k-1, k, k+1``, see
  :func:`basalseg.foundation.runner.slice_image`): the channels go to the encoder's 3 colour
  channels as given instead of one slice repeated (LiteMedSAM: as floats; SAM-2: as 8-bit RGB).
  Prompts and masks are on the ``(H, W)`` pixel grid either way.
* ``predict(boxes, points, point_labels)`` takes **all** prompts for that image at once:
  ``boxes`` ``(N, 4)`` XYXY in pixels of the image given to ``set_image`` (inclusive corners),
  ``points`` ``(N, P, 2)`` as ``(x, y)`` pixels, ``point_labels`` ``(N, P)`` with 1 positive and
  0 negative. It returns ``(N, H, W)`` boolean masks on that image's pixel grid.
* Calling ``predict`` before ``set_image`` raises ``RuntimeError``.

A :class:`BatchedFoundationBackend` also encodes several slices in one encoder pass
(``encode(images) -> embeddings``) and decodes the prompts of one of them
(``predict_on(embedding, boxes, points, point_labels)``, same conventions as ``predict``); the
runner (:func:`basalseg.foundation.runner.run_foundation`) uses that interface when a backend
has it (``isinstance(backend, BatchedFoundationBackend)``) and ``set_image``/``predict`` otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["FoundationBackend", "BatchedFoundationBackend", "resize_longest_side", "pick_device",
           "check_prompt_arrays"]


@runtime_checkable
class FoundationBackend(Protocol):
    """A frozen promptable 2D segmentation model (SAM-2, LiteMedSAM, ...)."""

    #: short name recorded in outputs and weight manifests (``"litemedsam"``, ``"sam2"``).
    name: str
    #: the square side, in pixels, of the encoder's input.
    native_size: int

    def set_image(self, image: np.ndarray) -> None:
        """Encode one slice, ``(H, W)`` float32 in [0, 1], or an ``(H, W, 3)`` 3-slice context image."""
        ...

    def predict(
        self,
        boxes: np.ndarray,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
    ) -> np.ndarray:
        """Masks ``(N, H, W)`` bool for ``N`` box prompts (with optional points) on the set image."""
        ...

    def describe(self) -> dict:
        """Provenance: backend name, checkpoint path and sha256, configuration."""
        ...


@runtime_checkable
class BatchedFoundationBackend(FoundationBackend, Protocol):
    """A :class:`FoundationBackend` that also encodes several slices per encoder pass (the fast
    LiteMedSAM backend, :class:`~basalseg.foundation.litemedsam_fast.FastLiteMedSAMBackend`)."""

    def encode(self, images: Sequence[np.ndarray]) -> list[Any]:
        """One embedding per image (each as ``set_image`` takes it), encoded in one batch."""
        ...

    def predict_on(
        self,
        embedding: Any,
        boxes: np.ndarray,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
    ) -> np.ndarray:
        """Masks ``(N, H, W)`` bool for ``N`` prompts on an image encoded by :meth:`encode`
        (the conventions of ``predict``)."""
        ...


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``"cuda"`` when available and not told otherwise, else CPU; ``"cuda"`` without a GPU is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        from ..errors import BackendUnavailableError

        raise BackendUnavailableError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    return device


def resize_longest_side(height: int, width: int, target: int) -> tuple[int, int, float]:
    """Size ``(h, w)`` after scaling the longest side to ``target`` (aspect kept), and the scale."""
    scale = target / max(height, width)
    return max(int(round(height * scale)), 1), max(int(round(width * scale)), 1), scale


def check_prompt_arrays(
    boxes: np.ndarray, points: np.ndarray | None, point_labels: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Validate and convert prompt arrays to float32/int64 with the documented shapes."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if points is None or len(points) == 0 or np.asarray(points).size == 0:
        return boxes, None, None
    points = np.asarray(points, dtype=np.float32)
    if points.ndim != 3 or points.shape[0] != boxes.shape[0] or points.shape[2] != 2:
        raise ValueError(f"points must be (N, P, 2) with N={boxes.shape[0]}, got {points.shape}")
    if point_labels is None:
        point_labels = np.ones(points.shape[:2], dtype=np.int64)
    point_labels = np.asarray(point_labels, dtype=np.int64)
    if point_labels.shape != points.shape[:2]:
        raise ValueError(f"point_labels must be {points.shape[:2]}, got {point_labels.shape}")
    return boxes, points, point_labels
