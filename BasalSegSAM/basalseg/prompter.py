"""Stage 2: the prompt generator finds each structure's region; prompts are drawn from it.

The canonical 1 mm image (values in [0, 1]) is average-pooled by 2 to 2 mm, the prompter U-Net
runs over it with MONAI sliding-window inference, and its argmax is kept per structure as the
largest connected component, then repeated back to 1 mm. Per axial slice, each structure's
region gives a box and 5 positive points (:func:`basalseg.prompts.prompts_from_classes`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from scipy import ndimage

from .prompts import PromptSet, prompts_from_classes
from .spatial import Grid
from .structures import STRUCTURES

__all__ = ["downsample2", "upsample2", "predict_coarse", "generate_prompts", "largest_component_per_class",
           "PROMPTER_ROI"]

#: sliding-window size at 2 mm (192 mm: most brains fit in one window).
PROMPTER_ROI = (96, 96, 96)


def downsample2(volume: np.ndarray) -> np.ndarray:
    """Average-pool a ``(X, Y, Z)`` array by 2 (odd sizes padded by edge replication first)."""
    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    pad = [0, volume.shape[2] % 2, 0, volume.shape[1] % 2, 0, volume.shape[0] % 2]
    if any(pad):
        t = F.pad(t, pad, mode="replicate")
    return F.avg_pool3d(t, 2)[0, 0].numpy()


def upsample2(classes: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Repeat a 2 mm labelmap back to 1 mm and cut it to ``shape`` (inverse of :func:`downsample2`)."""
    up = classes.repeat(2, axis=0).repeat(2, axis=1).repeat(2, axis=2)
    return np.ascontiguousarray(up[: shape[0], : shape[1], : shape[2]])


def largest_component_per_class(classes: np.ndarray) -> np.ndarray:
    """Keep each structure's largest 26-connected component (drops stray islands)."""
    out = np.zeros_like(classes)
    structure = np.ones((3, 3, 3), dtype=bool)
    for s in STRUCTURES:
        mask = classes == s.class_index
        if not mask.any():
            continue
        lab, n = ndimage.label(mask, structure=structure)
        if n > 1:
            sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
            mask = lab == (int(np.argmax(sizes)) + 1)
        out[mask] = s.class_index
    return out


@torch.inference_mode()
def predict_coarse(net: torch.nn.Module, image01: np.ndarray, device: torch.device | str = "cpu",
                   return_probabilities: bool = False):
    """The prompter's labelmap for a canonical 1 mm image.

    Args:
        net: prompter network (1 channel in, 9 out).
        image01: ``(X, Y, Z)`` canonical image in [0, 1].
        device: torch device.
        return_probabilities: also return the 2 mm softmax ``(9, X/2, Y/2, Z/2)``.

    Returns:
        ``(X, Y, Z)`` uint8 class indices on the canonical grid (and the probabilities).
    """
    low = downsample2(image01)
    x = torch.from_numpy(low)[None, None].to(device)
    logits = sliding_window_inference(x, PROMPTER_ROI, sw_batch_size=1, predictor=net, overlap=0.25,
                                      mode="gaussian", padding_mode="constant", cval=0.0)
    probs = torch.softmax(logits.float(), dim=1)[0]
    classes = largest_component_per_class(probs.argmax(0).to(torch.uint8).cpu().numpy())
    classes = upsample2(classes, image01.shape)
    if return_probabilities:
        return classes, probs.cpu().numpy()
    return classes


def generate_prompts(net: torch.nn.Module, image01: np.ndarray, grid: Grid, device: torch.device | str = "cpu",
                     min_pixels: int = 4, box_margin: int = 2) -> tuple[PromptSet, np.ndarray]:
    """Prompts for every structure on every axial slice the prompter marks.

    Returns:
        ``(prompts, coarse_classes)``; the coarse labelmap is on the canonical grid.
    """
    classes = predict_coarse(net, image01, device)
    prompts = prompts_from_classes(classes, grid, min_pixels=min_pixels, box_margin=box_margin)
    prompts.source = {"generator": "prompter"}
    return prompts, classes
