"""Stage 5: the student U-Net reads [T1, SDM channels] and gives the final labelmap.

The student works at 1 mm on a crop of the canonical grid: the bounding box of the foundation
masks and the prompter's regions, grown by :data:`STUDENT_MARGIN` voxels. MONAI sliding-window
inference covers crops of any size with :data:`STUDENT_ROI` windows.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from .spatial import bounding_box

__all__ = ["student_input", "build_student_input", "student_roi", "predict_student", "STUDENT_ROI", "STUDENT_MARGIN",
           "INPUT_MODES", "mirror_input", "unmirror_classes"]

#: what the student reads besides the T1: "sdm" (the method), "mask" (raw foundation masks), "t1" (nothing;
#: an ablation baseline).
INPUT_MODES = ("sdm", "mask", "t1")

STUDENT_ROI = (96, 96, 96)
STUDENT_MARGIN = 12


def student_input(image01: np.ndarray, sdm: np.ndarray) -> np.ndarray:
    """Stack the T1 (``(X, Y, Z)`` in [0, 1]) and the SDM channels (``(8, X, Y, Z)``) to ``(9, X, Y, Z)``."""
    if sdm.shape[1:] != image01.shape:
        raise ValueError(f"SDM shape {sdm.shape[1:]} does not match the image {image01.shape}")
    return np.concatenate([image01[None].astype(np.float32), sdm.astype(np.float32)], axis=0)


def build_student_input(image01: np.ndarray, masks: np.ndarray, mode: str = "sdm", band: float = 10.0) -> np.ndarray:
    """The student's input channels for one crop.

    Args:
        image01: ``(X, Y, Z)`` T1 in [0, 1].
        masks: ``(8, X, Y, Z)`` foundation masks, or ``(P, 8, X, Y, Z)``: one stack per plane
            (multi-plane fusion), fused as below so the student still reads 9 channels.
        mode: one of :data:`INPUT_MODES`: ``"sdm"`` -> ``(9, ...)`` T1 + SDM channels (with
            planes: the mean of the planes' SDMs, :func:`basalseg.sdm.fused_sdm_channels`),
            ``"mask"`` -> ``(9, ...)`` T1 + binary masks (with planes: the fraction of planes
            marking each voxel), ``"t1"`` -> ``(1, ...)``.
        band: SDM band (``"sdm"`` only).
    """
    from .sdm import fused_sdm_channels, sdm_channels

    masks = np.asarray(masks)
    if masks.ndim not in (4, 5):
        raise ValueError(f"foundation masks must be (8, X, Y, Z) or (planes, 8, X, Y, Z), got shape {masks.shape}")
    if mode == "sdm":
        return student_input(image01, sdm_channels(masks, band=band) if masks.ndim == 4
                             else fused_sdm_channels(masks, band=band))
    if mode == "mask":
        return student_input(image01, masks.astype(np.float32) if masks.ndim == 4
                             else masks.astype(np.float32).mean(axis=0))
    if mode == "t1":
        return image01[None].astype(np.float32)
    raise ValueError(f"unknown student input mode {mode!r}; expected one of {INPUT_MODES}")


def student_roi(masks, coarse: np.ndarray | None = None, margin: int = STUDENT_MARGIN,
                region: tuple[slice, ...] | None = None) -> tuple[slice, ...] | None:
    """Crop (slices) around the foundation masks ``(8, X, Y, Z)`` (or ``(P, 8, X, Y, Z)``: every
    plane's; a full array or :class:`~basalseg.foundation.boxed.BoxedMasks`), the prompter's
    regions (``coarse > 0``) and ``region`` (slices, e.g. the prompt boxes'), grown by ``margin``
    and clipped to the grid; None when all are empty."""
    from .foundation.boxed import BoxedMasks, hull

    if isinstance(masks, BoxedMasks):
        found, shape = masks.bounding_box(), masks.grid_shape
    else:
        masks = np.asarray(masks)
        shape = masks.shape[-3:]
        found = bounding_box(masks.reshape((-1,) + shape).any(axis=0))
    box = hull(found, None if coarse is None else bounding_box(coarse > 0), region)
    if box is None:
        return None
    return tuple(slice(max(b.start - margin, 0), min(b.stop + margin, n)) for b, n in zip(box, shape))


def mirror_input(inputs: np.ndarray) -> np.ndarray:
    """The student input ``(C, X, Y, Z)`` mirrored left-right: on the RAS+ canonical grid axis 0 is
    left-right, so the crop is reversed along it and, for the 9-channel inputs (T1 + one channel per
    structure, channel c = class c), each left structure's channel swapped with its right twin's
    (:func:`basalseg.structures.left_right_permutation`); a T1-only input is only reversed."""
    from .structures import NUM_CLASSES, left_right_permutation

    inputs = np.asarray(inputs)
    flipped = inputs[:, ::-1]
    if inputs.shape[0] == NUM_CLASSES:
        perm = left_right_permutation()
        flipped = flipped[[0] + [perm[c] for c in range(1, NUM_CLASSES)]]
    return np.ascontiguousarray(flipped)


def unmirror_classes(channels: torch.Tensor) -> torch.Tensor:
    """Per-class maps ``(9, X, Y, Z)`` (logits or probabilities) of a mirrored input mapped back
    onto the unmirrored crop: class channels swapped back, axis 0 reversed."""
    from .structures import left_right_permutation

    return torch.flip(channels[left_right_permutation()], dims=(1,))


def _logits(net: torch.nn.Module, inputs: np.ndarray, device, overlap: float) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))[None].to(device)
    return sliding_window_inference(x, STUDENT_ROI, sw_batch_size=1, predictor=net, overlap=overlap,
                                    mode="gaussian", padding_mode="constant", cval=0.0)[0].float()


@torch.inference_mode()
def predict_student(net: torch.nn.Module, inputs: np.ndarray, device: torch.device | str = "cpu",
                    overlap: float = 0.25, return_probabilities: bool = False, logit_offsets: np.ndarray | None = None,
                    return_logits: bool = False, mirror: bool = False):
    """Class indices (uint8, ``(X, Y, Z)``) for a ``(9, X, Y, Z)`` student input crop.

    Args:
        logit_offsets: ``(9,)`` per-class offsets added to the logits before the argmax and the
            softmax (the volume calibration, :mod:`basalseg.calibration`); None = none.
        return_probabilities: also return the softmax ``(9, X, Y, Z)`` float32 (of the offset
            logits).
        return_logits: return only the raw logits ``(9, X, Y, Z)`` float32 (no offsets).
        mirror: left-right test-time augmentation: the logits are the mean of the crop's and of
            its mirror image's (:func:`mirror_input`, mapped back with :func:`unmirror_classes`);
            two student passes. The offsets, if any, are added to that mean.
    """
    logits = _logits(net, inputs, device, overlap)
    if mirror:
        logits = 0.5 * (logits + unmirror_classes(_logits(net, mirror_input(inputs), device, overlap)))
    if return_logits:
        return logits.cpu().numpy()
    if logit_offsets is not None:
        logits = logits + torch.as_tensor(np.asarray(logit_offsets, np.float32), device=logits.device).view(-1, 1, 1, 1)
    probs = torch.softmax(logits, dim=0)
    classes = probs.argmax(0).to(torch.uint8).cpu().numpy()
    if return_probabilities:
        return classes, probs.cpu().numpy()
    return classes
