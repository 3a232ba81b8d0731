"""SAM's mask decoder re-associated for one image and N boxes (:class:`FastMaskDecoder`).

The image embedding is never repeated per box; the projections of the first transformer block
that do not depend on the box are computed once per slice; attention projections over the 4096
image tokens are folded into the few prompt tokens (softmax rows sum to 1 and a key bias is
constant along a softmax row, so ``softmax(q K^T)`` ``V W + b`` equals the unfolded form); only
the one output token that ``multimask_output=False`` returns is carried through the last
attention and the hypernetwork; the upscaling runs only on the part of the 64 x 64 embedding
that is not padding. ``ConvTranspose2d`` with kernel 2 / stride 2 is a per-pixel matrix product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["FastMaskDecoder", "SliceEmbedding"]


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

