"""The fast LiteMedSAM backend and the volume runner (measured in ``benchmarks/README.md``).

:class:`FastLiteMedSAMBackend` is LiteMedSAM with the speed levers; the levers themselves live in

* :mod:`~basalseg.foundation.litemedsam_encoder` (the TinyViT encoder: BatchNorm folded, the
  first stage in row bands, ONNX Runtime, ...),
* :mod:`~basalseg.foundation.litemedsam_decoder` (:class:`FastMaskDecoder`, the re-associated
  mask decoder),
* :mod:`~basalseg.foundation.stride` (the optional slice stride, which changes the masks).

Their names are re-exported here. :func:`run_foundation_fast` runs any plane (the prompts'
``axis``), batches slices through the encoder when asked (slower on CPU, meant for CUDA) and
takes ``context`` (the 3-slice context, see :mod:`basalseg.foundation.runner`);
:class:`FastLiteMedSAMBackend` accepts ``(H, W)`` and ``(H, W, 3)`` images like
:class:`~basalseg.foundation.litemedsam.LiteMedSAMBackend`.

Levers that change the masks (off by default, quality measured by the benchmark): ``stride``
(:func:`plan_slices`) and ``input_size`` below 256 (:func:`resize_encoder`; Dice 0.81 against
the 256 masks at 192). Options that keep the masks but only pay off in long runs:
``encoder="compile"`` (``torch.compile``) and ``encoder="onnx"``.

On CUDA the encoder and decoder run under ``torch.inference_mode`` with bf16 autocast (``amp``)
and channels-last tensors.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BackendUnavailableError, Cancelled
from ..options import ENCODERS
from ..prompts import Prompt, PromptSet
from ..structures import STRUCTURES
from .litemedsam import LiteMedSAMBackend
from .litemedsam_decoder import FastMaskDecoder, SliceEmbedding
from .litemedsam_encoder import (BandedMBConv, FusedTinyViT, OrtEncoder, fold_batchnorm, onnx_cache_path,
                                 optimise_encoder, resize_encoder)
from .runner import SliceMaskCache, _roi, plane_view, prompt_signature, slice_image
from .stride import fill_between, interpolate_mask, plan_slices, stride_masks

__all__ = [
    "ENCODERS",
    "BandedMBConv",
    "FastLiteMedSAMBackend",
    "FastMaskDecoder",
    "FusedTinyViT",
    "SliceEmbedding",
    "fold_batchnorm",
    "interpolate_mask",
    "onnx_cache_path",
    "optimise_encoder",
    "plan_slices",
    "resize_encoder",
    "run_foundation_fast",
    "stride_masks",
]

log = logging.getLogger("basalseg")

ProgressFn = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------
# backend
# ---------------------------------------------------------------------------------------------


class FastLiteMedSAMBackend(LiteMedSAMBackend):
    """LiteMedSAM with the speed levers; a drop-in :class:`~basalseg.foundation.base.FoundationBackend`
    (same ``name``, so slice caches and students trained with ``litemedsam`` stay valid).

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
        from .base import check_prompt_arrays

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


# ---------------------------------------------------------------------------------------------
# runner: batched slices, optional slice stride
# ---------------------------------------------------------------------------------------------


def run_foundation_fast(
    backend,
    volume01: np.ndarray,
    prompts: PromptSet,
    *,
    crop: bool = True,
    crop_margin: int = 16,
    batch: int = 1,
    stride: int = 1,
    cache: SliceMaskCache | None = None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    context: bool = False,
) -> np.ndarray:
    """:func:`~basalseg.foundation.runner.run_foundation` with slices encoded ``batch`` at a time
    and an optional slice ``stride`` (:func:`plan_slices`). With ``batch=1, stride=1`` and the same
    backend it gives the same masks as ``run_foundation`` (one encoder pass per slice).

    The slices are those of the prompts' plane (``prompts.axis``); ``context`` gives the backend
    slices ``k-1, k, k+1`` as its 3 channels (:func:`~basalseg.foundation.runner.slice_image`).

    Backends without ``encode``/``predict_on`` (any :class:`FoundationBackend`) are run one slice
    at a time with ``set_image``/``predict``.
    """
    if volume01.shape != tuple(prompts.grid.shape):
        raise ValueError(f"image shape {volume01.shape} does not match the prompts' grid {tuple(prompts.grid.shape)}")
    axis = prompts.axis
    nx, ny, _ = prompts.plane_shape()
    out = np.zeros((len(STRUCTURES),) + volume01.shape, dtype=bool)
    view = plane_view(out, axis)
    index = {s.key: s.class_index - 1 for s in STRUCTURES}
    plan = plan_slices(prompts, stride)
    batched = hasattr(backend, "encode") and hasattr(backend, "predict_on")
    batch = max(int(batch), 1) if batched else 1
    todo: list[int] = []
    results: dict[int, dict] = {}
    for k, on_slice in plan.items():
        signature = prompt_signature(on_slice)
        cached = cache.get(k, signature, backend.name, context=context, axis=axis) if cache is not None else None
        if cached is not None:
            results[k] = cached
        else:
            todo.append(k)
    done = len(results)
    total = len(plan)
    for start in range(0, len(todo), batch):
        if should_stop is not None and should_stop():
            raise Cancelled("cancelled during the foundation model")
        chunk = todo[start : start + batch]
        rois, images = [], []
        for k in chunk:
            x0, y0, x1, y1 = _roi(plan[k], (nx, ny), crop_margin) if crop else (0, 0, nx, ny)
            rois.append((x0, y0, x1, y1))
            images.append(slice_image(volume01, k, axis, context)[y0:y1, x0:x1])
        embeddings = backend.encode(images) if batched else [None] * len(chunk)
        for k, (x0, y0, _, _), image, emb in zip(chunk, rois, images, embeddings):
            on_slice = plan[k]
            boxes, points, labels = _prompt_arrays(on_slice, x0, y0)
            if batched:
                masks = backend.predict_on(emb, boxes, points, labels)
            else:
                backend.set_image(image)
                masks = backend.predict(boxes, points, labels)
            entry = {p.structure: (x0, y0, np.ascontiguousarray(m.T)) for p, m in zip(on_slice, masks)}
            results[k] = entry
            if cache is not None:
                cache.put(k, prompt_signature(on_slice), backend.name, entry, context=context, axis=axis)
            done += 1
            if progress is not None:
                progress(done, total)
    for k, entry in results.items():
        for key, (x0, y0, mask_xy) in entry.items():
            view[index[key], x0 : x0 + mask_xy.shape[0], y0 : y0 + mask_xy.shape[1], k] |= mask_xy
    if stride > 1:
        fill_between(out, prompts, plan, index)
        if progress is not None:  # the interpolation is part of the stage: report its end
            progress(total, total)
    return out



def _prompt_arrays(on_slice: list[Prompt], x0: int, y0: int):
    offset = np.array([x0, y0, x0, y0], dtype=np.float32)
    boxes = np.array([p.box for p in on_slice], dtype=np.float32) - offset
    n_pts = max((len(p.points) for p in on_slice), default=0)
    points = labels = None
    if n_pts:
        points = np.zeros((len(on_slice), n_pts, 2), dtype=np.float32)
        labels = np.full((len(on_slice), n_pts), -1, dtype=np.int64)
        for n, p in enumerate(on_slice):
            if p.points:
                points[n, : len(p.points)] = np.asarray(p.points, dtype=np.float32) - offset[:2]
                labels[n, : len(p.points)] = p.point_labels
    return boxes, points, labels
