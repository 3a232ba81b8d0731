"""LiteMedSAM's TinyViT image encoder for inference: the speed levers that keep its arithmetic.

* :func:`fold_batchnorm`: every ``Conv2d`` + ``BatchNorm2d`` pair becomes one convolution.
* :class:`BandedMBConv`: on CPU, the first stage (two 4x-expanded MBConv blocks at 256 x 256)
  computed in 16-row bands so its hidden activations stay in cache.
* :func:`optimise_encoder`: both of the above, channels-last.
* :func:`resize_encoder`: the same weights at another input side (changes the masks).
* ONNX Runtime (:class:`OrtEncoder`): the folded encoder exported once and cached in
  ``<cache>/onnx/`` keyed by the weights' sha256, the input size and the torch version.

Measured in ``benchmarks/README.md``.
"""

from __future__ import annotations

import copy
import logging
import os
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BackendUnavailableError

__all__ = ["BandedMBConv", "OrtEncoder", "fold_batchnorm", "onnx_cache_path", "optimise_encoder", "resize_encoder"]

log = logging.getLogger("basalseg")


def fold_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` (in eval mode) with each ``Conv2d`` followed by a ``BatchNorm2d`` in the
    same ``nn.Sequential`` folded into one ``Conv2d`` (the TinyViT ``Conv2d_BN`` blocks)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    module = copy.deepcopy(module).eval()

    def visit(parent: torch.nn.Module) -> None:
        for name, child in list(parent.named_children()):
            kids = list(child.children()) if isinstance(child, torch.nn.Sequential) else []
            if (len(kids) == 2 and type(kids[0]) is torch.nn.Conv2d and isinstance(kids[1], torch.nn.BatchNorm2d)
                    and kids[1].track_running_stats):
                setattr(parent, name, fuse_conv_bn_eval(kids[0], kids[1]))
            else:
                visit(child)

    visit(module)
    return module


class BandedMBConv(torch.nn.Module):
    """TinyViT's ``MBConv`` (1x1 conv, GELU, depthwise 3x3, GELU, 1x1 conv, residual, GELU) with
    BatchNorm already folded, computed in bands of ``band`` rows (plus a one-row halo for the
    depthwise convolution) so the 4x-expanded hidden activations stay in cache. Same arithmetic as
    the unbanded block; on LiteMedSAM's 256 x 256 first stage it is ~1.8x faster on CPU."""

    def __init__(self, block: torch.nn.Module, band: int = 16):
        super().__init__()
        for name in ("conv1", "conv2", "conv3"):
            if not isinstance(getattr(block, name), torch.nn.Conv2d):
                raise TypeError("BandedMBConv needs an MBConv whose BatchNorms are folded (fold_batchnorm)")
        self.w1 = torch.nn.Parameter(block.conv1.weight[:, :, 0, 0].t().contiguous(), requires_grad=False)
        self.b1 = torch.nn.Parameter(block.conv1.bias.detach().clone(), requires_grad=False)
        self.dw = block.conv2
        self.w3 = torch.nn.Parameter(block.conv3.weight[:, :, 0, 0].t().contiguous(), requires_grad=False)
        self.b3 = torch.nn.Parameter(block.conv3.bias.detach().clone(), requires_grad=False)
        self.band = int(band)
        if self.dw.kernel_size != (3, 3) or self.dw.stride != (1, 1) or self.dw.padding != (1, 1):
            raise TypeError("BandedMBConv expects a 3x3, stride 1, padding 1 depthwise convolution")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, height, width = x.shape
        xl = x.permute(0, 2, 3, 1)  # NHWC (a view when x is channels-last)
        out = torch.empty_like(xl)
        hidden = self.w1.shape[1]
        for r0 in range(0, height, self.band):
            r1 = min(r0 + self.band, height)
            h0, h1 = max(r0 - 1, 0), min(r1 + 1, height)
            hid = F.gelu(torch.addmm(self.b1, xl[:, h0:h1].reshape(-1, c), self.w1)).reshape(n, h1 - h0, width, hidden)
            hid = F.pad(hid.permute(0, 3, 1, 2), (1, 1, int(r0 == 0), int(r1 == height)))  # zero padding at the image edge
            hid = F.gelu(F.conv2d(hid, self.dw.weight, self.dw.bias, groups=self.dw.groups))
            y = torch.addmm(self.b3, hid.permute(0, 2, 3, 1).reshape(-1, hidden), self.w3).reshape(n, r1 - r0, width, c)
            out[:, r0:r1] = F.gelu(y + xl[:, r0:r1])
        return out.permute(0, 3, 1, 2)


def optimise_encoder(encoder: torch.nn.Module, device: torch.device | str = "cpu", band: int | None = 16) -> torch.nn.Module:
    """A copy of a LiteMedSAM TinyViT encoder for inference: BatchNorm folded, channels-last, and
    on CPU the first stage's MBConv blocks computed in row bands (:class:`BandedMBConv`)."""
    fused = fold_batchnorm(encoder)
    if band and torch.device(device).type == "cpu":
        first = getattr(fused, "layers", [None])[0]
        blocks = getattr(first, "blocks", None)
        if blocks is not None:
            for i, block in enumerate(blocks):
                if type(block).__name__ == "MBConv":
                    blocks[i] = BandedMBConv(block, band)
    return fused.to(device).to(memory_format=torch.channels_last).eval()


def _tinyvit_forward(self, x: torch.Tensor) -> torch.Tensor:
    """TinyViT's ``forward_features`` for any input side (the original hard-codes a 64 x 64 grid)."""
    x = self.patch_embed(x)
    for layer in self.layers:
        x = layer(x)
    g = self.embedding_grid
    return self.neck(x.view(x.shape[0], g, g, x.shape[-1]).permute(0, 3, 1, 2))


def resize_encoder(encoder: torch.nn.Module, size: int) -> torch.nn.Module:
    """A copy of LiteMedSAM's TinyViT that takes ``size`` x ``size`` inputs (a multiple of 4) and
    gives a ``size/4`` embedding grid, with the same weights: every layer's resolution is scaled
    (attention windows, their biases and every weight do not depend on the input size). The
    network was trained at 256 only, so its masks at other sizes must be checked (the benchmark
    reports their Dice against the 256 ones)."""
    size = int(size)
    if size % 4 or size < 32:
        raise ValueError(f"encoder input size must be a multiple of 4 and >= 32, got {size}")
    enc = copy.deepcopy(encoder)
    full = int(enc.img_size) if hasattr(enc, "img_size") else 256

    def scaled(res):
        return tuple(int(r) * size // full for r in res)

    for module in enc.modules():
        if hasattr(module, "input_resolution") and isinstance(module.input_resolution, tuple):
            module.input_resolution = scaled(module.input_resolution)
    enc.img_size = size
    enc.embedding_grid = size // 4
    enc.forward = types.MethodType(_tinyvit_forward, enc)
    return enc


def onnx_cache_path(checkpoint_sha256: str, what: str = "encoder", size: int = 256) -> Path:
    """Where the exported ONNX model of a LiteMedSAM checkpoint lives in the user cache."""
    from ..download import cache_dir

    tv = torch.__version__.split("+")[0]
    return cache_dir() / "onnx" / f"litemedsam_{what}{size}_{checkpoint_sha256[:16]}_torch{tv}_b1.onnx"


def _export_onnx(encoder: torch.nn.Module, path: Path, size: int) -> None:
    """Export the (folded) encoder for one ``(1, 3, size, size)`` image, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    example = torch.rand(1, 3, size, size)
    try:
        with torch.no_grad():
            # batch 1: TinyViT's reshapes are traced with the example's batch size
            kwargs = dict(input_names=["image"], output_names=["embedding"], opset_version=17)
            try:
                torch.onnx.export(encoder.cpu(), (example,), str(tmp), dynamo=False, **kwargs)
            except TypeError:  # torch without the dynamo switch
                torch.onnx.export(encoder.cpu(), (example,), str(tmp), **kwargs)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


class OrtEncoder:
    """The encoder as an ONNX Runtime session (CPU), exported on first use and cached."""

    def __init__(self, encoder: torch.nn.Module, checkpoint_sha256: str, size: int, threads: int | None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError("encoder 'onnx' needs the package onnxruntime (pip install onnxruntime onnx)") from exc
        path = onnx_cache_path(checkpoint_sha256, size=size)
        if not path.is_file():
            log.info("exporting the LiteMedSAM encoder to %s (once)", path)
            _export_onnx(encoder, path, size)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception:  # a corrupt or foreign cache file: export again
            path.unlink(missing_ok=True)
            _export_onnx(encoder, path, size)
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = path

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(np.concatenate([self.session.run(None, {"image": x[i : i + 1]})[0] for i in range(len(x))]))

