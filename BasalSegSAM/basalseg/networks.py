"""The two 3D networks (MONAI U-Nets) and their checkpoint files.

* **Prompt generator** (``prompter``): 1 channel (T1) in, 9 classes out, on the canonical grid
  downsampled to 2 mm. About 0.6 M parameters; it only needs to find each structure's region.
* **Student** (``student``): 9 channels in (T1 + 8 SDM channels, see :mod:`basalseg.sdm`),
  9 classes out, at 1 mm on a crop around the structures. About 3.1 M parameters.

A checkpoint is a ``torch.save`` dictionary read with ``weights_only=True`` (no code runs on
load)::

    {"format": "basalseg-weights", "version": 1, "kind": "prompter" | "student",
     "architecture": {...UNet keyword arguments...}, "state_dict": {...}, "meta": {...}}

``meta`` records the foundation backend a student was trained with, the training data and
settings. Shipped checkpoints are listed in ``weights/manifest.json`` with their sha256
(:mod:`basalseg.weights`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from monai.networks.nets import UNet

from .errors import CheckpointError
from .structures import NUM_CLASSES

__all__ = [
    "PROMPTER_ARCH",
    "STUDENT_ARCH",
    "PROMPTER_SPACING",
    "build_network",
    "save_checkpoint",
    "load_checkpoint",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "basalseg-weights"
CHECKPOINT_VERSION = 1

#: The prompt generator works on the canonical grid downsampled by 2 (2 mm voxels).
PROMPTER_SPACING = 2.0

PROMPTER_ARCH: dict = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": NUM_CLASSES,
    "channels": [16, 32, 64, 128],
    "strides": [2, 2, 2],
    "num_res_units": 1,
    "norm": "instance",
}

STUDENT_ARCH: dict = {
    "spatial_dims": 3,
    "in_channels": 1 + (NUM_CLASSES - 1),
    "out_channels": NUM_CLASSES,
    "channels": [18, 36, 72, 144, 288],
    "strides": [2, 2, 2, 2],
    "num_res_units": 1,
    "norm": "instance",
}


def build_network(architecture: dict) -> UNet:
    """A MONAI ``UNet`` from an architecture dictionary (UNet keyword arguments)."""
    arch = dict(architecture)
    try:
        return UNet(
            spatial_dims=int(arch.pop("spatial_dims")),
            in_channels=int(arch.pop("in_channels")),
            out_channels=int(arch.pop("out_channels")),
            channels=tuple(int(c) for c in arch.pop("channels")),
            strides=tuple(int(s) for s in arch.pop("strides")),
            **arch,
        )
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise CheckpointError(f"invalid network architecture {architecture!r}: {exc}") from exc


def _first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line ("" for an empty message, e.g. an empty file's)."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def save_checkpoint(path: str | os.PathLike, kind: str, architecture: dict, net: torch.nn.Module, meta: dict | None = None) -> None:
    """Write a checkpoint atomically (temporary file in the same folder, then rename)."""
    from .outputs import atomic_write_bytes
    import io

    if kind not in ("prompter", "student"):
        raise ValueError(f"kind must be 'prompter' or 'student', got {kind!r}")
    buffer = io.BytesIO()
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "kind": kind,
            "architecture": copy.deepcopy(architecture),
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "meta": meta or {},
        },
        buffer,
    )
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_checkpoint(path: str | os.PathLike, kind: str, device: str | torch.device = "cpu") -> tuple[UNet, dict]:
    """Load a checkpoint of the given kind; return ``(network in eval mode, meta)``.

    Raises:
        CheckpointError: missing file, not a checkpoint, wrong kind, or weights that do not fit
            the architecture; the message names the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{kind} checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: corrupt or not a checkpoint ({type(exc).__name__}: {_first_line(exc)})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a BasalSegSAM checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')!r} is not supported")
    if ckpt.get("kind") != kind:
        raise CheckpointError(f"{path}: holds a {ckpt.get('kind')!r} network, a {kind!r} was expected")
    net = build_network(ckpt.get("architecture") or {})  # missing: a CheckpointError naming it
    try:
        net.load_state_dict(ckpt["state_dict"], strict=True)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the {kind} architecture ({_first_line(exc)})") from exc
    net.to(device).eval()
    return net, dict(ckpt.get("meta") or {})
