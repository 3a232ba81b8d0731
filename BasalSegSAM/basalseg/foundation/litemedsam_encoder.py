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

__all__ = ["BandedMBConv", "FusedTinyViT", "OrtEncoder", "fold_batchnorm", "onnx_cache_path", "optimise_encoder", "resize_encoder"]

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


def optimise_encoder(encoder: torch.nn.Module, device: torch.device | str = "cpu", band: int | None = 16,
                     nhwc: bool = True) -> torch.nn.Module:
    """A copy of a LiteMedSAM TinyViT encoder for inference, BatchNorm folded. On CPU,
    :class:`FusedTinyViT` (channels-last tokens end to end, oneDNN fused post-ops, fused
    attention, the first stage in row bands); with ``nhwc=False`` or off the CPU, the module
    itself in channels-last, on CPU with the first stage's MBConv blocks in row bands
    (:class:`BandedMBConv`)."""
    fused = fold_batchnorm(encoder)
    cpu = torch.device(device).type == "cpu"
    if cpu and nhwc and hasattr(fused, "patch_embed") and hasattr(fused, "neck"):
        return FusedTinyViT(fused.eval(), band=band).eval()
    if band and cpu:
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



# ---------------------------------------------------------------------------------------------
# the whole encoder in channels-last (NHWC) tokens, with oneDNN's fused post-ops on CPU
# ---------------------------------------------------------------------------------------------


def _mkldnn_fusion_available() -> bool:
    """oneDNN's fused linear/convolution + post-op kernels (what Inductor's CPU backend calls)
    exist in this torch and agree with the unfused ops on a small case."""
    try:
        ops = torch.ops.mkldnn
        if not torch.backends.mkldnn.is_available():
            return False
        x, w, b = torch.randn(7, 5), torch.randn(3, 5), torch.randn(3)
        y = ops._linear_pointwise(x, w, b, "gelu", [], "none")
        z = ops._linear_pointwise.binary(x, y, w, b, "add")
        xc, wc, bc = torch.randn(1, 4, 6, 6).contiguous(memory_format=torch.channels_last), torch.randn(4, 1, 3, 3), torch.randn(4)
        c = ops._convolution_pointwise(xc, wc, bc, [1, 1], [1, 1], [1, 1], 4, "gelu", [], "none")
        ok = (torch.allclose(y, F.gelu(F.linear(x, w, b)), atol=1e-5) and torch.allclose(z, F.linear(x, w, b) + y, atol=1e-5)
              and torch.allclose(c, F.gelu(F.conv2d(xc, wc, bc, padding=1, groups=4)), atol=1e-5))
        return bool(ok)
    except (AttributeError, RuntimeError, TypeError):
        return False


class _Ops:
    """Linear and convolution with an optional GELU / residual add, fused by oneDNN where available."""

    def __init__(self, fused: bool):
        self.fused = fused

    def linear(self, x, w, b, gelu: bool = False):
        if self.fused:
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu" if gelu else "none", [], "none" if gelu else "")
        y = F.linear(x, w, b)
        return F.gelu(y) if gelu else y

    def linear_add(self, x, other, w, b):
        """``x @ w.T + b + other``."""
        if self.fused:
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, w, b, "add")
        return torch.addmm(other if b is None else other + b, x, w.t())

    def conv(self, x, w, b, padding: int, stride: int, groups: int, gelu: bool = False):
        """``x``: NCHW view of channels-last memory; the result is channels-last too."""
        if self.fused:
            return torch.ops.mkldnn._convolution_pointwise(x, w, b, [padding] * 2, [stride] * 2, [1, 1], groups,
                                                           "gelu" if gelu else "none", [], "none" if gelu else "")
        y = F.conv2d(x, w, b, stride=stride, padding=padding, groups=groups)
        return F.gelu(y) if gelu else y


def _w2d(conv: torch.nn.Conv2d) -> torch.Tensor:
    """A 1x1 convolution's weight as a linear layer's ``(out, in)``."""
    return conv.weight.detach()[:, :, 0, 0].contiguous()


def _cl(conv: torch.nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().contiguous(memory_format=torch.channels_last)


def _bias(module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()


class FusedTinyViT(torch.nn.Module):
    """LiteMedSAM's TinyViT encoder (BatchNorm folded, :func:`fold_batchnorm`) run on
    channels-last ``(B, H, W, C)`` tokens from end to end, with the same arithmetic:

    * no layout copies between the blocks: the 1x1 convolutions are matrix products on the token
      rows, the depthwise convolutions read the tokens as a channels-last image, and TinyViT's
      ``(B, L, C)`` <-> ``(B, C, H, W)`` round trips around each local convolution are views;
    * on CPU, oneDNN's fused kernels: linear/convolution + GELU, linear + residual add
      (``torch.ops.mkldnn._linear_pointwise`` / ``_convolution_pointwise``, what Inductor's CPU
      backend emits), when this torch has them (:func:`_mkldnn_fusion_available`);
    * window attention through ``scaled_dot_product_attention`` with the attention biases as a
      float mask (one fused kernel instead of matmul, scale, bias add, softmax, matmul);
    * the first stage (256 x 256, 4x-expanded MBConv) in row bands (see :class:`BandedMBConv`);
    * the neck's ``LayerNorm2d`` as ``layer_norm`` over the channel axis of the tokens.

    The weights are shared with ``folded`` (no copy); ``folded`` must stay alive.
    """

    def __init__(self, folded: torch.nn.Module, band: int | None = 16, fused_ops: bool | None = None):
        super().__init__()
        self.ops = _Ops(_mkldnn_fusion_available() if fused_ops is None else bool(fused_ops))
        self.band = int(band) if band else None
        pe = folded.patch_embed.seq
        self.embed = [(_w2d(pe[0]), _bias(pe[0]), True), (_w2d(pe[2]), _bias(pe[2]), False)]
        self.stages = []
        for layer in folded.layers:
            blocks = []
            for blk in layer.blocks:
                if type(blk).__name__ == "MBConv":
                    blocks.append(("mbconv", {"w1": _w2d(blk.conv1), "b1": _bias(blk.conv1), "dw": _cl(blk.conv2),
                                              "bdw": _bias(blk.conv2), "w3": _w2d(blk.conv3), "b3": _bias(blk.conv3)}))
                else:
                    a = blk.attn
                    blocks.append(("vit", {
                        "ws": blk.window_size, "heads": a.num_heads, "kd": a.key_dim, "d": a.d, "scale": a.scale,
                        "ln": a.norm, "qkv_w": a.qkv.weight.detach(), "qkv_b": _bias(a.qkv),
                        "proj_w": a.proj.weight.detach(), "proj_b": _bias(a.proj),
                        # 4D: the shape SDPA's fused CPU kernel accepts for a mask broadcast over windows
                        "ab": a.attention_biases.detach()[:, a.attention_bias_idxs][None].contiguous(),
                        "lc": _cl(blk.local_conv), "lc_b": _bias(blk.local_conv),
                        "mln": blk.mlp.norm, "fc1_w": blk.mlp.fc1.weight.detach(), "fc1_b": _bias(blk.mlp.fc1),
                        "fc2_w": blk.mlp.fc2.weight.detach(), "fc2_b": _bias(blk.mlp.fc2)}))
            down = None
            if layer.downsample is not None:
                d = layer.downsample
                down = {"w1": _w2d(d.conv1), "b1": _bias(d.conv1), "dw": _cl(d.conv2), "bdw": _bias(d.conv2),
                        "stride": d.conv2.stride[0], "w3": _w2d(d.conv3), "b3": _bias(d.conv3)}
            self.stages.append((blocks, down))
        neck = folded.neck
        self.neck = {"w1": _w2d(neck[0]), "ln1": neck[1], "w2": _cl(neck[2]), "ln2": neck[3]}
        self._keep = folded  # owns the weights

    # -- pieces -----------------------------------------------------------------------------
    def _mbconv(self, p: dict, x: torch.Tensor) -> torch.Tensor:
        b, height, width, c = x.shape
        hidden = p["w1"].shape[0]
        band = self.band or height
        out = torch.empty_like(x)
        for r0 in range(0, height, band):
            r1 = min(r0 + band, height)
            h0, h1 = max(r0 - 1, 0), min(r1 + 1, height)  # one halo row each side for the 3x3 convolution
            hid = self.ops.linear(x[:, h0:h1].reshape(-1, c), p["w1"], p["b1"], gelu=True).view(b, h1 - h0, width, hidden)
            # zero padding at the band's edges: wrong only on halo rows, which are dropped
            hid = self.ops.conv(hid.permute(0, 3, 1, 2), p["dw"], p["bdw"], 1, 1, hidden, gelu=True)
            hid = hid[:, :, r0 - h0 : r1 - h0].permute(0, 2, 3, 1).reshape(-1, hidden)
            y = self.ops.linear_add(hid, x[:, r0:r1].reshape(-1, c), p["w3"], p["b3"])
            rows = out[:, r0:r1]
            if rows.is_contiguous():  # batch 1: the GELU writes the rows of the result directly
                torch.ops.aten.gelu.out(y.view(rows.shape), out=rows)
            else:
                rows.copy_(F.gelu(y).view(rows.shape))
        return out

    def _merging(self, p: dict, x: torch.Tensor) -> torch.Tensor:
        b, height, width, c = x.shape
        t = self.ops.linear(x.reshape(-1, c), p["w1"], p["b1"], gelu=True).view(b, height, width, -1)
        o = t.shape[-1]
        t = self.ops.conv(t.permute(0, 3, 1, 2), p["dw"], p["bdw"], 1, p["stride"], o, gelu=True).permute(0, 2, 3, 1)
        h2, w2 = t.shape[1:3]
        return self.ops.linear(t.reshape(-1, o), p["w3"], p["b3"]).view(b, h2, w2, o)

    def _vit(self, p: dict, x: torch.Tensor) -> torch.Tensor:
        b, height, width, c = x.shape
        ws, heads = p["ws"], p["heads"]
        pb, pr = (-height) % ws, (-width) % ws
        xp = F.pad(x, (0, 0, 0, pr, 0, pb)) if pb or pr else x
        nh, nw = (height + pb) // ws, (width + pr) // ws
        win = xp.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)  # (B nh nw, N, C)
        ln = p["ln"]
        t = F.layer_norm(win, (c,), ln.weight, ln.bias, ln.eps)  # padding tokens normalised too, as TinyViT does
        n_tok = ws * ws
        qkv = self.ops.linear(t.view(-1, c), p["qkv_w"], p["qkv_b"]).view(-1, n_tok, heads, 2 * p["kd"] + p["d"])
        q, k, v = qkv.split([p["kd"], p["kd"], p["d"]], dim=3)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=p["ab"], scale=p["scale"])  # (Bw, heads, N, d)
        o = self.ops.linear(o.transpose(1, 2).reshape(-1, heads * p["d"]), p["proj_w"], p["proj_b"])
        o = o.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, nh * ws, nw * ws, c)
        x = x + o[:, :height, :width]
        x = self.ops.conv(x.permute(0, 3, 1, 2), p["lc"], p["lc_b"], 1, 1, c).permute(0, 2, 3, 1)
        mln = p["mln"]
        t = F.layer_norm(x, (c,), mln.weight, mln.bias, mln.eps).reshape(-1, c)
        h = self.ops.linear(t, p["fc1_w"], p["fc1_b"], gelu=True)
        return self.ops.linear_add(h, x.reshape(-1, c), p["fc2_w"], p["fc2_b"]).view(b, height, width, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` image -> ``(B, 256, S/4, S/4)`` embedding (channels-last)."""
        x = x.permute(0, 2, 3, 1)  # NHWC (a view for a channels-last input)
        b, height, width, c = x.shape
        t = x.reshape(-1, c)
        for w, bias, gelu in self.embed:
            t = self.ops.linear(t, w, bias, gelu=gelu)
        x = t.view(b, height, width, -1)
        for blocks, down in self.stages:
            for kind, p in blocks:
                x = self._mbconv(p, x) if kind == "mbconv" else self._vit(p, x)
            if down is not None:
                x = self._merging(down, x)
        nk = self.neck
        b, height, width, c = x.shape
        t = self.ops.linear(x.reshape(-1, c), nk["w1"], None)
        t = F.layer_norm(t, (t.shape[-1],), nk["ln1"].weight, nk["ln1"].bias, nk["ln1"].eps).view(b, height, width, -1)
        t = F.conv2d(t.permute(0, 3, 1, 2), nk["w2"], None, padding=1).permute(0, 2, 3, 1)
        t = F.layer_norm(t, (t.shape[-1],), nk["ln2"].weight, nk["ln2"].bias, nk["ln2"].eps)
        return t.permute(0, 3, 1, 2)
