"""The student's dynamic loss: Dice first, moving toward a boundary (distance-map) loss.

``L(t) = (1 - a(t)) * L_dice + a(t) * L_boundary``

* ``L_dice`` is MONAI's ``DiceCELoss`` (soft Dice over the 8 structures plus cross-entropy),
  which trains regions quickly and stably from scratch.
* ``L_boundary`` is the boundary loss of Kervadec et al. (MIDL 2019): the mean over structures
  and voxels of ``softmax_c(v) * phi_c(v)``, where ``phi_c`` is the reference's signed distance
  for structure ``c`` (negative inside, positive outside, in voxels), clipped to
  ``[-clip, clip]`` and divided by ``clip`` so it lies in [-1, 1]; a structure absent from the
  patch has ``phi = +1`` everywhere. It rewards probability inside the true shape and
  penalises it in proportion to the distance outside, which sharpens edges — what volumes
  depend on. MONAI has no such loss; this is the published formula on MONAI-shaped tensors.
* ``a(t) = a_max * sigmoid(k * (t - t_mid))`` with ``t`` the fraction of training done:
  Dice dominates early (``a(0) = 0.0033 a_max`` for the defaults ``k = 10, t_mid = 0.5``), the
  boundary term takes over smoothly and reaches ``a_max`` (default 0.5) at the end. A sigmoid
  schedule instead of a step avoids a jump in the loss surface.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.losses import DiceCELoss

from ..sdm import signed_distance

__all__ = ["BoundaryLoss", "DynamicLoss", "boundary_weight", "reference_distance_maps"]


def boundary_weight(progress: float, a_max: float = 0.5, k: float = 10.0, t_mid: float = 0.5) -> float:
    """``a(t)`` of the module docstring, ``progress`` in [0, 1]."""
    return a_max / (1.0 + math.exp(-k * (min(max(progress, 0.0), 1.0) - t_mid)))


def reference_distance_maps(labels: np.ndarray, num_classes: int, clip: float = 20.0) -> np.ndarray:
    """``phi`` for each structure class 1..C-1 of a class-index patch ``(X, Y, Z)``: ``(C-1, X, Y, Z)`` float32."""
    out = np.ones((num_classes - 1,) + labels.shape, dtype=np.float32)
    for c in range(1, num_classes):
        mask = labels == c
        if mask.any() and not mask.all():
            out[c - 1] = np.clip(signed_distance(mask), -clip, clip) / clip
        elif mask.all():
            out[c - 1] = -1.0
    return out


class BoundaryLoss(torch.nn.Module):
    """Kervadec boundary loss on logits ``(B, C, X, Y, Z)`` and precomputed ``phi`` ``(B, C-1, X, Y, Z)``."""

    def forward(self, logits: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=1)[:, 1:]
        return (probs * phi).mean()


class DynamicLoss(torch.nn.Module):
    """``(1 - a) DiceCE + a Boundary``; call :meth:`set_progress` each step.

    Args:
        a_max: final boundary weight.
        k, t_mid: sigmoid steepness and midpoint (fraction of training).
    """

    def __init__(self, a_max: float = 0.5, k: float = 10.0, t_mid: float = 0.5):
        super().__init__()
        if not 0.0 <= a_max <= 1.0:
            raise ValueError(f"a_max must be in [0, 1], got {a_max}")
        self.dice = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
        self.boundary = BoundaryLoss()
        self.a_max, self.k, self.t_mid = a_max, k, t_mid
        self.alpha = boundary_weight(0.0, a_max, k, t_mid)

    def set_progress(self, progress: float) -> float:
        self.alpha = boundary_weight(progress, self.a_max, self.k, self.t_mid)
        return self.alpha

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Args: logits ``(B, C, ...)``, labels ``(B, 1, ...)`` class indices, phi ``(B, C-1, ...)``."""
        dice = self.dice(logits, labels)
        boundary = self.boundary(logits, phi)
        total = (1.0 - self.alpha) * dice + self.alpha * boundary
        return total, {"dice_ce": float(dice.detach()), "boundary": float(boundary.detach()), "alpha": self.alpha}
