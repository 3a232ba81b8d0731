"""Speed levers for the LiteMedSAM backend and the volume runner (measured in ``benchmarks/README.md``).

Exact levers (same masks as the reference path up to float rounding):

* :func:`fold_batchnorm`: every ``Conv2d`` + ``BatchNorm2d`` pair of the TinyViT encoder becomes
  one convolution (inference only).
* :class:`BandedMBConv`: on CPU, the encoder's first stage (two 4x-expanded MBConv blocks at
  256 x 256) computed in 16-row bands so its hidden activations stay in cache.
* :class:`FastMaskDecoder`: SAM's mask decoder re-associated for one image and N boxes. The image
  embedding is never repeated per box; the projections of the first transformer block that do not
  depend on the box are computed once per slice; attention projections over the 4096 image
  tokens are folded into the few prompt tokens (softmax rows sum to 1 and a key bias is constant
  along a softmax row, so ``softmax(q K^T)`` ``V W + b`` equals the unfolded form); only the one
  output token that ``multimask_output=False`` returns is carried through the last attention and
  the hypernetwork; the upscaling runs only on the part of the 64 x 64 embedding that is not
  padding. ``ConvTranspose2d`` with kernel 2 / stride 2 is a per-pixel matrix product.
* ``encoder="onnx"``: the BN-folded encoder exported once to ONNX and run by ONNX Runtime
  (packages ``onnxruntime`` and ``onnx``); the exported file is cached in ``<cache>/onnx/`` keyed
  by the weights' sha256, the input size and the torch version.
* batching slices through the encoder (:func:`run_foundation_fast`; slower on CPU, meant for CUDA).

:func:`run_foundation_fast` runs any plane (the prompts' ``axis``) and takes ``context`` (the
3-slice context, see :mod:`basalseg.foundation.runner`); :class:`FastLiteMedSAMBackend` accepts
``(H, W)`` and ``(H, W, 3)`` images like :class:`~basalseg.foundation.litemedsam.LiteMedSAMBackend`.

Levers that change the masks (off by default, quality measured by the benchmark):

* ``stride`` in :func:`run_foundation_fast`: encode every ``stride``-th prompted slice (plus
  each structure's first and last slice) and fill the slices between by linear interpolation of
  the 2D signed distances along z (shape-based interpolation; :func:`plan_slices`).
* ``input_size`` below 256 (:func:`resize_encoder`): the same weights at a smaller encoder input;
  measured to change the masks too much (Dice 0.81 against the 256 masks at 192).

Options that keep the masks but only pay off in long runs: ``encoder="compile"``
(``torch.compile`` of the folded encoder, ~1.15x after 35-180 s of compilation) and
``encoder="onnx"`` (within +-10% of the folded torch encoder on this CPU).

On CUDA the encoder and decoder run under ``torch.inference_mode`` with bf16 autocast (``amp``)
and channels-last tensors.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BackendUnavailableError, Cancelled
from ..prompts import Prompt, PromptSet
from ..structures import STRUCTURES
from .litemedsam import LiteMedSAMBackend
from .runner import SliceMaskCache, _roi, plane_view, prompt_signature, slice_image

__all__ = [
    "ENCODERS",
    "BandedMBConv",
    "FastLiteMedSAMBackend",
    "FastMaskDecoder",
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

#: encoder implementations of :class:`FastLiteMedSAMBackend`.
ENCODERS = ("torch", "fused", "onnx", "compile")

ProgressFn = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------
# encoder: BatchNorm folding, ONNX Runtime, torch.compile
# ---------------------------------------------------------------------------------------------


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


class _OrtEncoder:
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
# decoder
# ---------------------------------------------------------------------------------------------


@dataclass
class SliceEmbedding:
    """One encoded slice: what :meth:`FastLiteMedSAMBackend.predict_on` needs besides the prompts."""

    embedding: torch.Tensor  # (256, 64, 64)
    image_hw: tuple[int, int]
    scale: float
    resized_hw: tuple[int, int]
    shared: dict | None = None  # box-independent decoder terms, filled on first use


class FastMaskDecoder:
    """SAM's ``MaskDecoder`` (+ ``TwoWayTransformer``) for one image and N prompts, re-associated
    (module docstring). Reads the weights of the given modules; keeps no copy of them.

    Only ``multimask_output=False`` (the first mask token) with no mask input is supported, which
    is how :class:`~basalseg.foundation.litemedsam.LiteMedSAMBackend` calls the decoder.
    """

    def __init__(self, mask_decoder: torch.nn.Module, prompt_encoder: torch.nn.Module):
        self.md = mask_decoder
        self.pe = prompt_encoder
        self.tf = mask_decoder.transformer
        if len(self.tf.layers) != 2 or not self.tf.layers[0].skip_first_layer_pe:
            raise ValueError("FastMaskDecoder expects SAM's two-block TwoWayTransformer")
        self._dense_pe: torch.Tensor | None = None

    def dense_pe(self) -> torch.Tensor:
        """``(HW, C)`` positional encoding of the embedding grid (computed once)."""
        if self._dense_pe is None:
            pe = self.pe.get_dense_pe()  # (1, C, H, W)
            self._dense_pe = pe[0].flatten(1).transpose(0, 1).contiguous()
        return self._dense_pe

    # -- attention helpers (all exact re-associations of segment_anything's Attention) -------
    @staticmethod
    def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
        *lead, n, c = x.shape
        return x.reshape(*lead, n, h, c // h).transpose(-3, -2)  # (..., h, n, d)

    @staticmethod
    def _merge(x: torch.Tensor) -> torch.Tensor:
        *lead, h, n, d = x.shape
        return x.transpose(-3, -2).reshape(*lead, n, h * d)

    def _tokens_to_image(self, attn: torch.nn.Module, q: torch.Tensor, k_img: torch.Tensor, v_img: torch.Tensor) -> torch.Tensor:
        """``attn(q=q, k=k_img, v=v_img)`` for a few query tokens ``q`` ``(N, T, C)`` over image
        tokens ``(N, HW, C)``, without projecting the image tokens: the query is pulled back
        through ``k_proj`` (its bias is constant along a softmax row and drops out) and ``v_proj``
        is applied after the weighted sum (softmax rows sum to 1)."""
        h = attn.num_heads
        n, t, _ = q.shape
        d = attn.internal_dim // h
        qh = self._heads(attn.q_proj(q), h) * (1.0 / math.sqrt(d))  # (N, h, T, d)
        wk = attn.k_proj.weight.reshape(h, d, -1)  # (h, d, C)
        qk = torch.matmul(qh, wk).reshape(n, h * t, -1)  # (N, hT, C)
        a = torch.softmax(torch.bmm(qk, k_img.transpose(1, 2)), dim=-1)  # (N, hT, HW)
        av = torch.bmm(a, v_img).reshape(n, h, t, -1)  # (N, h, T, C)
        wv = attn.v_proj.weight.reshape(h, d, -1)  # (h, d, C)
        out = torch.matmul(av, wv.transpose(-1, -2)) + attn.v_proj.bias.reshape(h, 1, d)  # (N, h, T, d)
        return attn.out_proj(self._merge(out))

    def _image_to_tokens(self, attn: torch.nn.Module, k_tok: torch.Tensor, v_tok: torch.Tensor, residual: torch.Tensor,
                         q_img: torch.Tensor | None = None, q_img_proj: torch.Tensor | None = None) -> torch.Tensor:
        """``residual + attn(q=q_img, k=k_tok, v=v_tok)`` for image-token queries ``(N or 1, HW, C)``
        over a few tokens ``(N, T, C)``. Either ``q_img_proj`` (the queries already projected,
        shared by all boxes) or ``q_img`` is given; for ``q_img`` the image side is not projected
        but the tokens are pulled back through ``q_proj``. ``out_proj`` is applied to the values
        before the weighted sum; softmax runs over the few tokens along a non-contiguous axis
        (fast), and the residual add is fused into the last matrix product."""
        h = attn.num_heads
        n, t, _ = k_tok.shape
        d = attn.internal_dim // h
        kh = self._heads(attn.k_proj(k_tok), h) * (1.0 / math.sqrt(d))  # (N, h, T, d)
        if q_img_proj is not None:  # (h, d, HW)
            logits = torch.bmm(kh.transpose(0, 1).reshape(h, n * t, d), q_img_proj)  # (h, NT, HW)
            logits = logits.reshape(h, n, t, -1).transpose(0, 1)  # (N, h, T, HW)
        else:
            wq = attn.q_proj.weight.reshape(h, d, -1)  # (h, d, C)
            m = torch.matmul(kh, wq).reshape(n, h * t, -1)  # (N, hT, C)
            bias = (kh * attn.q_proj.bias.reshape(h, 1, d)).sum(-1).reshape(n, h * t, 1)  # (N, hT, 1)
            logits = torch.baddbmm(bias, m, q_img.transpose(1, 2)).reshape(n, h, t, -1)  # (N, h, T, HW)
        a = torch.softmax(logits, dim=2).reshape(n, h * t, -1)  # (N, hT, HW) (a copy when transposed above)
        vh = self._heads(attn.v_proj(v_tok), h)  # (N, h, T, d)
        wo = attn.out_proj.weight.reshape(-1, h, d)  # (C, h, d)
        vo = torch.einsum("nhtd,chd->nhtc", vh, wo).reshape(n, h * t, -1)  # (N, hT, C)
        residual = residual + attn.out_proj.bias
        return torch.baddbmm(residual.expand(n, -1, -1), a.transpose(1, 2), vo)

    # -- the decoder ----------------------------------------------------------------------------
    def shared_terms(self, embedding: torch.Tensor) -> dict:
        """Box-independent terms of one image: image tokens, and the first block's projections."""
        x = embedding.flatten(1).transpose(0, 1)  # (HW, C)
        x = (x + self.pe.no_mask_embed.weight.reshape(1, -1))[None]  # keys: image + "no mask" dense embedding
        pe = self.dense_pe()[None].to(x.dtype)
        block = self.tf.layers[0]
        xp = x + pe
        t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
        h = t2i.num_heads
        return {
            "keys": x.contiguous(),
            "pe": pe,
            # per head, laid out for (h, N*T, .) batched products without broadcasting copies
            "k1": self._heads(t2i.k_proj(xp)[0], h).transpose(1, 2).contiguous(),  # (h, d, HW)
            "v1": self._heads(t2i.v_proj(x)[0], h).contiguous(),  # (h, HW, d)
            "q1": self._heads(i2t.q_proj(xp)[0], h).transpose(1, 2).contiguous(),  # (h, d, HW)
        }

    def __call__(self, shared: dict, sparse: torch.Tensor, rows: int = 64, cols: int = 64) -> torch.Tensor:
        """Low-resolution mask logits ``(N, 4 rows, 4 cols)`` for N prompts' sparse embeddings
        ``(N, P, C)``; ``rows``/``cols`` limit the upscaling to the top-left part of the 64 x 64
        embedding (the rest is padding)."""
        md, tf = self.md, self.tf
        n = sparse.shape[0]
        out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens[None].expand(n, -1, -1).to(sparse.dtype), sparse], dim=1)  # (N, T, C)
        keys, pe = shared["keys"], shared["pe"]
        b0, b1 = tf.layers

        # block 0 (no PE on the first self-attention, no residual there)
        q = b0.norm1(b0.self_attn(q=tokens, k=tokens, v=tokens))
        attn = b0.cross_attn_token_to_image
        h, t = attn.num_heads, tokens.shape[1]
        qh = self._heads(attn.q_proj(q + tokens), h)  # (N, h, T, d)
        qh = qh.transpose(0, 1).reshape(h, n * t, -1) * (1.0 / math.sqrt(qh.shape[-1]))  # (h, NT, d)
        a = torch.softmax(torch.bmm(qh, shared["k1"]), dim=-1)  # (h, NT, HW)
        o = torch.bmm(a, shared["v1"]).reshape(h, n, t, -1).transpose(0, 1)  # (N, h, T, d)
        q = b0.norm2(q + attn.out_proj(self._merge(o)))
        q = b0.norm3(q + b0.mlp(q))
        keys = b0.norm4(self._image_to_tokens(b0.cross_attn_image_to_token, q + tokens, q, keys, q_img_proj=shared["q1"]))

        # block 1
        qt = q + tokens
        q = b1.norm1(q + b1.self_attn(q=qt, k=qt, v=q))
        kp = keys + pe
        q = b1.norm2(q + self._tokens_to_image(b1.cross_attn_token_to_image, q + tokens, kp, keys))
        q = b1.norm3(q + b1.mlp(q))
        keys = b1.norm4(self._image_to_tokens(b1.cross_attn_image_to_token, q + tokens, q, keys, q_img=kp))
        del kp

        # final token -> image attention, for the first mask token only (index 1)
        t1 = slice(1, 2)
        qf = q[:, t1] + self._final_attention(tf.final_attn_token_to_image, (q + tokens)[:, t1], keys, pe)
        mask_token = tf.norm_final_attn(qf)[:, 0]  # (N, C)
        hyper = md.output_hypernetworks_mlps[0](mask_token)  # (N, C/8)
        return self._upscale(keys, hyper, rows, cols)

    def _final_attention(self, attn: torch.nn.Module, q: torch.Tensor, keys: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        """``attn(q=q, k=keys + pe, v=keys)`` for one query token, with ``pe`` applied as a matrix
        product on the pulled-back query instead of an add over all image tokens."""
        h = attn.num_heads
        n, t, _ = q.shape
        d = attn.internal_dim // h
        qh = self._heads(attn.q_proj(q), h) * (1.0 / math.sqrt(d))
        qk = torch.matmul(qh, attn.k_proj.weight.reshape(h, d, -1)).reshape(n, h * t, -1)  # (N, hT, C)
        logits = torch.matmul(qk, pe[0].transpose(0, 1))  # (N, hT, HW)
        a = torch.softmax(torch.baddbmm(logits, qk, keys.transpose(1, 2)), dim=-1)
        av = torch.bmm(a, keys).reshape(n, h, t, -1)
        out = torch.matmul(av, attn.v_proj.weight.reshape(h, d, -1).transpose(-1, -2)) + attn.v_proj.bias.reshape(h, 1, d)
        return attn.out_proj(self._merge(out))

    def _upscale(self, keys: torch.Tensor, hyper: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """The two ``ConvTranspose2d(kernel 2, stride 2)`` + LayerNorm2d + GELU of
        ``output_upscaling`` and the hypernetwork product, on the top-left ``rows x cols`` of the
        embedding grid, without moving the large intermediate tensors: a transposed convolution
        with kernel 2 / stride 2 is a per-pixel matrix product whose 2 x 2 outputs are kept as a
        separate axis until the one-channel logits are assembled."""
        md = self.md
        n = keys.shape[0]
        grid = int(round(math.sqrt(keys.shape[1])))
        cin = keys.shape[-1]
        src = keys.reshape(n, grid, grid, cin)[:, :rows, :cols].reshape(-1, cin)  # (N r c, C)
        up1, ln, act1, up2, act2 = md.output_upscaling
        c1, c2 = up1.out_channels, up2.out_channels
        w1 = up1.weight.reshape(cin, c1, 4).transpose(1, 2).reshape(cin, 4 * c1)  # columns [(a1 b1) o1]
        y = torch.addmm(up1.bias.repeat(4), src, w1).reshape(-1, c1)  # (N r c 4, C1)
        y = act1(F.layer_norm(y, (c1,), ln.weight, ln.bias, ln.eps))
        w2 = up2.weight.reshape(c1, c2, 4).transpose(1, 2).reshape(c1, 4 * c2)  # columns [(a2 b2) o2]
        z = act2(torch.addmm(up2.bias.repeat(4), y, w2)).reshape(n, -1, c2)  # (N, r c 4 4, C2)
        m = torch.bmm(z, hyper[:, :, None]).reshape(n, rows, cols, 2, 2, 2, 2)  # (N, r, c, a1, b1, a2, b2)
        return m.permute(0, 1, 3, 5, 2, 4, 6).reshape(n, 4 * rows, 4 * cols)


# ---------------------------------------------------------------------------------------------
# backend
# ---------------------------------------------------------------------------------------------


class FastLiteMedSAMBackend(LiteMedSAMBackend):
    """LiteMedSAM with the speed levers; a drop-in :class:`~basalseg.foundation.base.FoundationBackend`
    (same ``name``, so slice caches and students trained with ``litemedsam`` stay valid).

    Args:
        checkpoint, device, use_points, threshold: as :class:`LiteMedSAMBackend`.
        encoder: ``"fused"`` (BatchNorm folded and, on CPU, the first stage banded; default), ``"onnx"`` (ONNX Runtime, CPU only;
            falls back to ``"fused"`` when onnxruntime is missing), ``"compile"``
            (``torch.compile``), or ``"torch"`` (the plain module).
        fast_decoder: use :class:`FastMaskDecoder` (else SAM's own decoder).
        amp: bf16 autocast on CUDA (ignored on CPU).
        threads: threads for ONNX Runtime (default: torch's).
        band: rows per band of the first encoder stage on CPU (:class:`BandedMBConv`); None = unbanded.
        input_size: encoder input side (default LiteMedSAM's 256); smaller is faster but changes the
            masks (:func:`resize_encoder`).
    """

    def __init__(self, checkpoint=None, device=None, use_points: bool = False, threshold: float = 0.0,
                 encoder: str = "fused", fast_decoder: bool = True, amp: bool = True, threads: int | None = None,
                 band: int | None = 16, input_size: int | None = None):
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
            fused = optimise_encoder(plain, self.device, band=band)
            self._encode = fused
            if encoder == "onnx":
                try:
                    self._encode = _OrtEncoder(fold_batchnorm(plain), self.checkpoint_sha256, self.native_size, threads)
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


def plan_slices(prompts: PromptSet, stride: int = 1) -> dict[int, list[Prompt]]:
    """The slices run through the foundation model, with their prompts.

    With ``stride`` 1, every prompted slice. With ``stride`` k > 1, slice ``z`` is run when
    ``(z - z_min) % k == 0`` (``z_min``: the first prompted slice) or when it is some structure's
    first or last prompted slice; a slice that is run gets all of its prompts (so its masks are
    exactly those of the all-slices run, whose region-of-interest crop depends on every box of the
    slice). A structure's prompted slices that are not run are interpolated between its nearest
    run slices below and above (:func:`interpolate_mask`).
    """
    stride = max(int(stride), 1)
    slices = prompts.slices()
    if not slices:
        return {}
    keep = set(slices)
    if stride > 1:
        keep = {z for z in slices if (z - slices[0]) % stride == 0}
        for s in STRUCTURES:
            own = prompts.for_structure(s.key)
            if own:
                keep.update((own[0].slice, own[-1].slice))
    return {z: prompts.on_slice(z) for z in sorted(keep)}


def stride_masks(masks: np.ndarray, prompts: PromptSet, stride: int) -> np.ndarray:
    """What :func:`run_foundation_fast` with ``stride`` returns, given the all-slices masks
    ``(8, X, Y, Z)`` of the same backend: the run slices are kept and the others interpolated. (A
    run slice's masks do not depend on the stride, see :func:`plan_slices`.) Used to measure the
    quality cost of a stride without running the model again."""
    plan = plan_slices(prompts, stride)
    out = np.zeros_like(masks)
    view, src = plane_view(out, prompts.axis), plane_view(masks, prompts.axis)
    for z in plan:
        view[:, :, :, z] = src[:, :, :, z]
    if stride > 1:
        _fill_between(out, prompts, plan, {s.key: s.class_index - 1 for s in STRUCTURES})
    return out


def _signed_distance_2d(mask: np.ndarray) -> np.ndarray:
    from ..sdm import signed_distance

    d = signed_distance(mask)
    return np.where(np.isfinite(d), d, np.sign(d) * 1e4).astype(np.float32)


def interpolate_mask(lower: np.ndarray, upper: np.ndarray, t: float) -> np.ndarray:
    """Shape-based interpolation between two 2D masks: ``(1 - t) d_lower + t d_upper < 0`` with
    ``d`` the signed distance to each mask's boundary (negative inside)."""
    d = (1.0 - t) * _signed_distance_2d(lower) + t * _signed_distance_2d(upper)
    return d < 0


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
        _fill_between(out, prompts, plan, index)
        if progress is not None:  # the interpolation is part of the stage: report its end
            progress(total, total)
    return out


def _fill_between(out: np.ndarray, prompts: PromptSet, plan: dict[int, list[Prompt]], index: dict[str, int]) -> None:
    """Interpolate each structure's prompted slices that were not run (``stride`` > 1), in the prompts' plane."""
    out = plane_view(out, prompts.axis)
    for s in STRUCTURES:
        own = [p.slice for p in prompts.for_structure(s.key)]
        run = [z for z in own if z in plan]
        c = index[s.key]
        wanted = set(own)
        for lo, hi in zip(run[:-1], run[1:]):
            for z in range(lo + 1, hi):
                if z in wanted:
                    out[c, :, :, z] = interpolate_mask(out[c, :, :, lo], out[c, :, :, hi], (z - lo) / (hi - lo))


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
