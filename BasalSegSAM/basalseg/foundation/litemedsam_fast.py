"""The fast LiteMedSAM backend: LiteMedSAM with the speed levers (measured in ``benchmarks/README.md``).

:class:`FastLiteMedSAMBackend` is a :class:`~basalseg.foundation.base.BatchedFoundationBackend`
(``encode`` several slices per pass, ``predict_on`` one of them) with the same masks as
:class:`~basalseg.foundation.litemedsam.LiteMedSAMBackend`. Its levers live in

* :mod:`~basalseg.foundation.litemedsam_encoder` (the TinyViT encoder: BatchNorm folded, the
  first stage in row bands, :class:`FusedTinyViT`, ONNX Runtime, ``torch.compile``,
  :func:`resize_encoder`),
* :mod:`~basalseg.foundation.litemedsam_decoder` (:class:`FastMaskDecoder`, the re-associated
  mask decoder).

The volume runner (crop, batches, stride, context, planes, cache) is
:func:`basalseg.foundation.runner.run_foundation`, the same for every backend.

Levers that change the masks (off by default, quality measured by the benchmark): ``input_size``
below 256 (:func:`resize_encoder`; Dice 0.81 against the 256 masks at 192) and the runner's
``stride``. Options that keep the masks but only pay off in long runs: ``encoder="compile"``
(``torch.compile``) and ``encoder="onnx"``.

On CUDA the encoder and decoder run under ``torch.inference_mode`` with bf16 autocast (``amp``)
and channels-last tensors.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BackendUnavailableError
from ..options import ENCODERS
from .base import check_prompt_arrays
from .litemedsam import LiteMedSAMBackend
from .litemedsam_decoder import FastMaskDecoder, SliceEmbedding
from .litemedsam_encoder import OrtEncoder, fold_batchnorm, optimise_encoder, resize_encoder

__all__ = ["ENCODERS", "FastLiteMedSAMBackend"]

log = logging.getLogger("basalseg")



# ---------------------------------------------------------------------------------------------
# backend
# ---------------------------------------------------------------------------------------------


class FastLiteMedSAMBackend(LiteMedSAMBackend):
    """LiteMedSAM with the speed levers; a drop-in
    :class:`~basalseg.foundation.base.BatchedFoundationBackend` (same ``name``, so slice caches and
    students trained with ``litemedsam`` stay valid).

    Args:
        checkpoint, device, use_points, threshold: as :class:`LiteMedSAMBackend`.
        encoder: ``"fused"`` (default: BatchNorm folded; on CPU :class:`FusedTinyViT`),
            ``"onnx"`` (ONNX Runtime, CPU only; falls back to ``"fused"`` when onnxruntime is
            missing), ``"compile"`` (``torch.compile`` of the folded, banded module), or
            ``"torch"`` (the plain module).
        fast_decoder: use :class:`FastMaskDecoder` (else SAM's own decoder).
        amp: bf16 autocast on CUDA (ignored on CPU).
        threads: threads for ONNX Runtime (default: torch's).
        band: rows per band of the first encoder stage on CPU (:class:`BandedMBConv`); None = unbanded.
        nhwc: on CPU, run the ``"fused"`` encoder as :class:`FusedTinyViT` (else the folded
            module with the banded first stage, the lever before it).
        input_size: encoder input side (default LiteMedSAM's 256); smaller is faster but changes the
            masks (:func:`resize_encoder`).
    """

    def __init__(self, checkpoint=None, device=None, use_points: bool = False, threshold: float = 0.0,
                 encoder: str = "fused", fast_decoder: bool = True, amp: bool = True, threads: int | None = None,
                 band: int | None = 16, input_size: int | None = None, nhwc: bool = True):
        super().__init__(checkpoint=checkpoint, device=device, use_points=use_points, threshold=threshold)
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}; got {encoder!r}")
        if input_size and int(input_size) != self.native_size:
            # the encoder, and the prompt encoder's coordinate frame and embedding grid, at another size
            self.native_size = int(input_size)
            self.net.image_encoder = resize_encoder(self.net.image_encoder, self.native_size)
            pe = copy.deepcopy(self.net.prompt_encoder)
            pe.input_image_size = (self.native_size, self.native_size)
            pe.image_embedding_size = (self.native_size // 4, self.native_size // 4)
            self.net.prompt_encoder = pe
        if encoder == "onnx" and self.device.type != "cpu":
            log.warning("encoder 'onnx' runs on CPU only; using 'fused' on %s", self.device)
            encoder = "fused"
        self.amp = bool(amp) and self.device.type == "cuda"
        self.fast_decoder = FastMaskDecoder(self.net.mask_decoder, self.net.prompt_encoder) if fast_decoder else None
        plain = self.net.image_encoder
        if encoder == "torch":
            self._encode = plain
        else:
            fused = optimise_encoder(plain, self.device, band=band, nhwc=nhwc and encoder == "fused")
            self._encode = fused
            if encoder == "onnx":
                try:
                    self._encode = OrtEncoder(fold_batchnorm(plain), self.checkpoint_sha256, self.native_size, threads)
                except BackendUnavailableError as exc:
                    log.warning("%s; using 'fused'", exc)
                    encoder = "fused"
            elif encoder == "compile":
                self._encode = torch.compile(fused, dynamic=False)
            # the plain encoder's weights are not needed any more
            self.net.image_encoder = torch.nn.Identity()
        self.encoder = encoder
        self._current: SliceEmbedding | None = None

    def describe(self) -> dict:
        out = super().describe()
        out.update({"encoder": self.encoder, "fast_decoder": self.fast_decoder is not None, "amp": self.amp,
                    "input_size": self.native_size})
        return out

    def _autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    # -- encoder ----------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, images: Sequence[np.ndarray]) -> list[SliceEmbedding]:
        """Encode several slices in one batch."""
        if not len(images):
            return []
        batch, meta = [], []
        for image in images:
            batch.append(self._prepare(image))
            meta.append((self._image_hw, self._scale, self._resized_hw))
        x = torch.cat(batch).contiguous(memory_format=torch.channels_last)
        with self._autocast():
            emb = self._encode(x)
        emb = emb.float()
        return [SliceEmbedding(emb[i], *m) for i, m in enumerate(meta)]

    def set_image(self, image: np.ndarray) -> None:
        self._current = self.encode([image])[0]
        self._embedding = self._current.embedding[None]
        self._image_hw, self._scale, self._resized_hw = self._current.image_hw, self._current.scale, self._current.resized_hw

    # -- decoder ----------------------------------------------------------------------------
    def predict(self, boxes: np.ndarray, points: np.ndarray | None = None,
                point_labels: np.ndarray | None = None) -> np.ndarray:
        if self._current is None:
            raise RuntimeError("call set_image() before predict()")
        return self.predict_on(self._current, boxes, points, point_labels)

    @torch.inference_mode()
    def predict_on(self, sl: SliceEmbedding, boxes: np.ndarray, points: np.ndarray | None = None,
                   point_labels: np.ndarray | None = None) -> np.ndarray:
        """Masks ``(N, H, W)`` for N prompts on an encoded slice (see ``predict``)."""
        boxes, points, point_labels = check_prompt_arrays(boxes, points, point_labels)
        h, w = sl.image_hw
        if len(boxes) == 0:
            return np.zeros((0, h, w), dtype=bool)
        if self.fast_decoder is None:
            self._embedding = sl.embedding[None]
            self._image_hw, self._scale, self._resized_hw = sl.image_hw, sl.scale, sl.resized_hw
            return LiteMedSAMBackend.predict(self, boxes, points, point_labels)
        box_t = torch.from_numpy(boxes * sl.scale).to(self.device)[:, None, :]
        pts = None
        if self.use_points and points is not None:
            pts = (torch.from_numpy(points * sl.scale).to(self.device), torch.from_numpy(point_labels).to(self.device))
        nh, nw = sl.resized_hw
        with self._autocast():
            sparse, _ = self.net.prompt_encoder(points=pts, boxes=box_t, masks=None)
            if sl.shared is None:
                sl.shared = self.fast_decoder.shared_terms(sl.embedding)
            grid = sl.embedding.shape[-1]
            stride = self.native_size // grid
            low = self.fast_decoder(sl.shared, sparse, rows=min(-(-nh // stride), grid), cols=min(-(-nw // stride), grid))
        size = 4 * grid  # the decoder's low-resolution mask side (256 for LiteMedSAM)
        crop = low[:, None, : int(round(nh * size / self.native_size)), : int(round(nw * size / self.native_size))]
        logits = F.interpolate(crop.float(), size=(h, w), mode="bilinear", align_corners=False)
        return (logits[:, 0] > self.threshold).cpu().numpy()
