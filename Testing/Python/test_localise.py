"""Tests of basalseg.localise: brain localisation for whole-head inputs and its QC errors (issue 11)."""

from __future__ import annotations

import numpy as np
import pytest

from basalseg.data import atlas
from basalseg.errors import BasalSegError
from basalseg.imageio import Volume
from basalseg.localise import (Localisation, NoBrainFoundError, NotT1Error, _template, localise, looks_skull_stripped,
                               map_back, register_rigid)
from basalseg.spatial import Grid
from localise_helpers import require_templates_and_simpleitk
from localise_helpers import rigid as _rigid

require_templates_and_simpleitk()



@pytest.fixture(scope="module")
def mni():
    return atlas.load_template("mni152")


def test_skull_stripped_rule(mni):
    assert looks_skull_stripped(mni.data, mni.voxel_volume_mm3)
    rng = np.random.default_rng(0)
    noisy = mni.data + np.abs(rng.normal(0, 0.02 * mni.data.max(), mni.shape))  # a noise floor, as a raw scan has
    assert not looks_skull_stripped(noisy, mni.voxel_volume_mm3)


def test_registration_recovers_a_known_pose(mni):
    """The template itself, placed with a known rotation and a scanner origin far away: the rigid
    registration finds that placement within 1.5 mm over the brain."""
    truth = _rigid((12.0, -8.0, 20.0), (40.0, -25.0, 120.0))
    moved = Volume(mni.data, truth @ mni.affine)
    found, _ = register_rigid(moved)
    _, brain, _, grid, _, _ = _template()
    pts = np.argwhere(brain)[::5000]
    world = (grid.affine[:3, :3] @ pts.T).T + grid.affine[:3, 3]
    hom = np.c_[world, np.ones(len(world))]
    err = np.linalg.norm((hom @ found.T)[:, :3] - (hom @ truth.T)[:, :3], axis=1)
    assert err.max() < 1.5, err.max()


def test_the_affine_refinement_recovers_a_brain_of_another_size_and_shape(mni):
    """The template scaled by 1.08 / 0.93 / 1.04 along its axes (a brain longer, narrower, taller
    than the template's), turned and placed far from the origin: the default (affine) localisation
    finds that placement within 1.5 mm over the brain and its scales within 0.02; the rigid one
    keeps the template's size (scales 1), so it is several mm off at the brain's edge."""
    truth = _rigid((10.0, -6.0, 15.0), (30.0, -20.0, 90.0))
    truth[:3, :3] = truth[:3, :3] @ np.diag([1.08, 0.93, 1.04])
    moved = Volume(mni.data, truth @ mni.affine)
    _, brain, _, grid, _, _ = _template()
    pts = np.argwhere(brain)[::5000]
    hom = np.c_[(grid.affine[:3, :3] @ pts.T).T + grid.affine[:3, 3], np.ones(len(pts))]

    def worst(loc):
        return float(np.linalg.norm((hom @ loc.template_to_input.T)[:, :3] - (hom @ truth.T)[:, :3], axis=1).max())

    _, affine = localise(moved, "on")
    _, rigid = localise(moved, "on", transform="rigid")
    assert affine.transform == "affine" and rigid.transform == "rigid"
    assert worst(affine) < 1.5, worst(affine)
    np.testing.assert_allclose(sorted(affine.scale), [0.93, 1.04, 1.08], atol=0.02)
    np.testing.assert_allclose(rigid.scale, [1.0, 1.0, 1.0], atol=1e-6)
    assert worst(rigid) > 3.0, worst(rigid)
    assert affine.to_dict()["transform"] == "affine" and "affine" in affine.to_dict()["method"]
    with pytest.raises(BasalSegError, match="transform must be one of"):
        localise(moved, "on", transform="similarity")


def test_the_scanner_origin_changes_nothing():
    """A whole head of the generator (seed 5, subject 1: MNI152, GMM contrast, turned 47 deg) and
    the same voxels with the world origin moved 500 mm (scanners put it anywhere): the same
    localisation (the registration runs with the field of view centred at the origin), so the same
    brain image and, through the same matrix, the same results. Before 2026-12-07 the moved head
    was registered 1.5 deg apart (one search needed its second, denser grid, the other did not)
    and its volumes came out up to 3 % apart."""
    from basalseg.data.generate import load_sources
    from basalseg.data.head import HeadConfig, brain_config_for_heads, synthesize_head
    from basalseg.data.synth import SynthConfig, subject_seed

    (source, _), = load_sources(("mni152",), "dk", brain_config_for_heads(SynthConfig()))
    head = synthesize_head(source, subject_seed(5, 1), SynthConfig(contrast="t1_gmm"), HeadConfig()).image
    move = np.eye(4)
    move[:3, 3] = 500.0
    out_a, loc_a = localise(head, "auto")
    out_b, loc_b = localise(Volume(head.data, move @ head.affine), "auto")
    assert loc_a.applied and loc_b.applied and loc_a.search == loc_b.search
    np.testing.assert_allclose(np.linalg.inv(move) @ loc_b.template_to_input, loc_a.template_to_input, atol=1e-6)
    np.testing.assert_allclose(out_b.data, out_a.data, atol=1e-4 * float(out_a.data.max()))


def test_bias_correction_undoes_a_strong_bias_field(mni):
    """N4 (:func:`basalseg.localise._bias_corrected`) on the template times a 0.4-1.6 ramp across the
    head: the corrected brain correlates with the unbiased one far better than the biased brain
    (measured 2026-12-06: 0.66 biased, 0.96 corrected)."""
    from basalseg.localise import _bias_corrected

    ramp = np.linspace(0.4, 1.6, mni.shape[0], dtype=np.float32)[:, None, None]
    biased = Volume((mni.data * ramp).astype(np.float32), mni.affine)
    corrected = _bias_corrected(biased)
    assert corrected is not None and corrected.data.shape == mni.shape and np.array_equal(corrected.affine, mni.affine)
    brain = mni.data > 0.1 * mni.data.max()

    def corr(a):
        return np.corrcoef(a[brain], mni.data[brain])[0, 1]

    assert corr(biased.data) < 0.7 and corr(corrected.data) > 0.95, (corr(biased.data), corr(corrected.data))  # 0.66 -> 0.96
    assert _bias_corrected(Volume(np.ones((3, 3, 3), np.float32), np.eye(4))) is None  # too small for N4: no retry


def test_a_refused_registration_is_tried_again_on_the_bias_corrected_input(mni, monkeypatch):
    """When the input as given would be refused (correlation < MIN_NCC), the search runs once more on
    the N4-corrected input and the better result is kept; provenance says so. An input that stays
    refused after the retry is refused as before."""
    import basalseg.localise as L

    real_search, real_n4 = L._search, L._bias_corrected
    calls = []

    def first_fails(volume, threads):
        calls.append("corrected" if volume.meta.get("n4") else "as given")
        if not volume.meta.get("n4"):  # the input as given: a failed alignment (correlation 0.05)
            matrix, aligned, _, _ = real_search(volume, threads)
            return matrix, np.zeros_like(aligned), 0.05, "3-step rotation grid"
        return real_search(volume, threads)

    def n4(volume, threads=1):
        out = real_n4(volume, threads)
        out.meta["n4"] = True
        return out

    monkeypatch.setattr(L, "_search", first_fails)
    monkeypatch.setattr(L, "_bias_corrected", n4)
    image, loc = L.localise(Volume(mni.data, mni.affine), "on")
    assert calls == ["as given", "corrected"] and loc.applied and loc.ncc > L.MIN_NCC
    assert "N4 bias correction" in loc.search and "kept it" in loc.search
    # stays refused: the corrected input aligns no better
    monkeypatch.setattr(L, "_search", lambda volume, threads: (np.eye(4), np.zeros(L._template()[3].shape, np.float32),
                                                               0.05, "3-step rotation grid"))
    with pytest.raises(NoBrainFoundError, match="tried again after N4"):
        L.localise(Volume(mni.data, mni.affine), "on")


def test_registration_finds_a_pitched_head_whose_best_start_ranks_fourth():
    """A whole head of the training generator (cohort seed 121, subject 9: ICBM 2009c, pitched
    19.5 deg, IAR axes, 0.82 mm, neck and eyes) whose right start basin the metric at the starts
    ranked only 4th: with the best 3 starts optimised it ended in the skull vault (correlation 0.03,
    "no brain found"); the short 6 mm optimisation of more starts finds it."""
    from basalseg.data.generate import load_sources
    from basalseg.data.head import HeadConfig, brain_config_for_heads, synthesize_head
    from basalseg.data.localised import localise_case
    from basalseg.data.synth import SynthConfig, subject_seed

    config = SynthConfig()
    (source, _), = load_sources(("icbm2009c",), "dk", brain_config_for_heads(config))
    head = synthesize_head(source, subject_seed(121, 9), config, HeadConfig())
    assert head.params["head"]["axcodes"] == "IAR"  # the generator still makes the case this test is about
    _, _, record = localise_case(head.image, head.labels)
    assert record["ncc"] > 0.45 and record["label_overlap"] > 0.6, record


def test_a_head_turned_about_two_axes_is_found_by_the_second_search():
    """A whole head of the generator (seed 7301, subject 2: MNI152, GMM contrast, rotated 15 / 29 /
    20 deg, SPR axes, 3.3 mm slices) that no start of the 3-step rotation grid brought into the right
    basin: the first search ended 12 deg off (correlation 0.35, label overlap 0.42, a silent misfit
    above the "no brain" threshold); the weak correlation starts the 5-step search, which finds it."""
    from basalseg.data.generate import load_sources
    from basalseg.data.head import HeadConfig, brain_config_for_heads, synthesize_head
    from basalseg.data.localised import localise_case
    from basalseg.data.synth import SynthConfig, subject_seed

    config = SynthConfig(contrast="t1_gmm")
    (source, _), = load_sources(("mni152",), "dk", brain_config_for_heads(SynthConfig()))
    head = synthesize_head(source, subject_seed(7301, 2), config, HeadConfig())
    assert head.params["head"]["axcodes"] == "SPR"  # the generator still makes the case this test is about
    _, _, record = localise_case(head.image, head.labels)
    assert "kept the second" in record["search"], record["search"]
    assert record["ncc"] > 0.5 and record["label_overlap"] > 0.65, record


def test_auto_localises_a_skull_stripped_brain_and_leaves_small_inputs_alone(mni):
    """Since 2026-12-07 ``auto`` localises every input whose field of view holds a whole brain,
    skull-stripped brains in the template's pose included (README "Results": about 0.01 Dice more
    on the held-out skull-stripped cohorts); a crop of the deep grey matter is left alone."""
    out, loc = localise(mni, "auto")
    assert loc.applied and "skull-stripped" in loc.reason and out.shape == _template()[3].shape, loc.reason
    assert loc.ncc > 0.95 and loc.contrast["head_tissue_fraction"] < 0.15
    crop = Volume(mni.data[40:120, 60:140, 50:90], mni.affine)  # 40 mm tall: not a whole brain
    out, loc = localise(crop, "auto")
    assert out is crop and loc.template_to_input is None and "field of view" in loc.reason
    out, loc = localise(mni, "off")
    assert out is mni and not loc.applied


def test_auto_tells_a_head_from_a_noisy_skull_stripped_brain(mni):
    """The head-tissue measure (what ``compare`` picks its repeatability study by): a bright shell
    around the aligned brain, as marrow and scalp fat give, counts as a head; the same brain with
    only a noise floor around it does not. Both are localised, turned or not."""
    from scipy import ndimage

    from basalseg.localise import HEAD_FRACTION

    rng = np.random.default_rng(1)
    brain = mni.data > 0.01 * mni.data.max()
    noisy = mni.data + np.abs(rng.normal(0, 0.02 * mni.data.max(), mni.shape))
    near = _rigid((0, 0, 5), (5, 5, 60)) @ mni.affine
    out, loc = localise(Volume(noisy.astype(np.float32), near), "auto")
    assert loc.applied and "skull-stripped" in loc.reason and out.shape == _template()[3].shape, loc.reason
    assert loc.contrast["head_tissue_fraction"] < HEAD_FRACTION
    assert abs(loc.rotation_deg[0] - 5) < 2, loc.rotation_deg
    pose = _rigid((0, 0, 15), (5, 5, 60)) @ mni.affine
    shell = ndimage.binary_dilation(brain, iterations=14) & ~ndimage.binary_dilation(brain, iterations=6)
    head = np.where(shell, 0.9 * mni.data.max(), noisy).astype(np.float32)
    out, loc = localise(Volume(head, pose), "auto")
    assert loc.applied and "head tissue" in loc.reason and out.shape == _template()[3].shape, loc.reason
    assert loc.contrast["head_tissue_fraction"] >= HEAD_FRACTION and abs(loc.rotation_deg[0] - 15) < 2
    assert np.allclose(out.affine, _template()[3].affine)
    assert float((out.data == 0).mean()) > 0.3  # skull-stripped: zero outside the (dilated) template brain


def test_prompts_of_a_localised_image_keep_their_transform(mni, monkeypatch):
    """``basalseg prompts`` on a whole head records the localisation in prompts.json; a ``segment``
    with those (edited) prompts resamples the input with exactly that transform, not a new
    registration, so the boxes stay where the user saw them; ``--localise off`` refuses them."""
    import json

    from basalseg import localise as localise_module
    from basalseg.errors import PromptsError
    from basalseg.pipeline import Pipeline, PipelineConfig
    from basalseg.prompts import Prompt, PromptSet, prompts_from_dict

    truth = _rigid((10.0, 0.0, -15.0), (20.0, -30.0, 90.0))
    head = Volume(mni.data, truth @ mni.affine)
    grid = _template()[3]
    record = {"applied": True, "template_to_input": truth.tolist(), "reason": "test"}
    ps = PromptSet(grid=grid, prompts=[Prompt("left_putamen", 80, [60, 120, 70, 135], [], [])],
                   source={"localisation": record}).validate()
    again = prompts_from_dict(json.loads(json.dumps(ps.to_dict())))  # through prompts.json
    assert np.allclose(again.template_to_input(), truth)
    world = again.world_grid()
    assert world.shape == grid.shape and np.allclose(world.affine, truth @ grid.affine)
    assert PromptSet(grid=grid).world_grid() is not None and PromptSet(grid=grid).template_to_input() is None
    with pytest.raises(PromptsError, match="4x4"):
        PromptSet(grid=grid, source={"localisation": {"applied": True, "template_to_input": [[1, 0]]}}).template_to_input()

    def no_registration(*args, **kwargs):
        raise AssertionError("registered again")

    monkeypatch.setattr(localise_module, "register_rigid", no_registration)
    out, loc = localise(head, "auto", template_to_input=truth)
    assert loc.applied and "not registered again" in loc.reason and np.allclose(loc.template_to_input, truth)
    inner = _template()[5]
    assert np.corrcoef(out.data[inner], _template()[0][inner])[0, 1] > 0.99  # the brain back in template position
    # the same prompts with another head (here: the same brain in another pose) name the prompts
    other = Volume(mni.data, _rigid((-25.0, 10.0, 30.0), (-60.0, 45.0, -20.0)) @ mni.affine)
    with pytest.raises(PromptsError, match="prompts were made for another image"):
        localise(other, "auto", template_to_input=truth)

    seen = {}

    def fake_as_given(self, volume, prompts=None, *args, **kwargs):
        seen["volume"] = volume
        raise RuntimeError("stop here")

    monkeypatch.setattr(Pipeline, "segment_as_given", fake_as_given)
    with pytest.raises(RuntimeError, match="stop here"):
        Pipeline(PipelineConfig(localise="auto")).segment(head, prompts=again)
    assert seen["volume"].shape == grid.shape and np.allclose(seen["volume"].affine, grid.affine)
    with pytest.raises(PromptsError, match="localise auto or on"):
        Pipeline(PipelineConfig(localise="off")).segment(head, prompts=again)


@pytest.mark.parametrize("kind", ["noise", "blob"])
def test_no_brain_found(kind):
    rng = np.random.default_rng(2)
    shape = (160, 180, 160)
    if kind == "noise":
        data = rng.random(shape).astype(np.float32)
    else:  # a knee-like blob: a bright ellipsoid with a dark core
        idx = np.indices(shape, dtype=np.float32)
        r = ((idx[0] - 80) / 40) ** 2 + ((idx[1] - 90) / 70) ** 2 + ((idx[2] - 80) / 40) ** 2
        data = np.where(r < 1, 0.8, 0.0) + np.where(r < 0.3, -0.5, 0.0) + rng.normal(0, 0.02, shape)
        data = data.astype(np.float32)
    with pytest.raises(NoBrainFoundError, match="no brain found") as info:
        localise(Volume(data, np.diag([1.0, 1.0, 1.0, 1.0])), "on")
    # and what to do if it is a brain T1 the registration could not align (severe artefacts and bias)
    assert "N4" in str(info.value) and "--localise off" in str(info.value)
    assert "contrast-enhanced" not in str(info.value)  # said only of images with a T1's tissue order


def test_a_t1_that_aligns_but_correlates_poorly_is_told_it_may_be_enhanced(mni, monkeypatch):
    """A brain T1 whose tissue order is a T1's but whose correlation with the template falls short
    (as a strongly contrast-enhanced T1's does): 'no brain found', saying it may be enhanced.
    Emulated by demanding more correlation than any image can reach (the MNI template reaches 1)."""
    import basalseg.localise as localise_module

    monkeypatch.setattr(localise_module, "MIN_NCC", 1.01)
    with pytest.raises(NoBrainFoundError, match="no brain found") as info:
        localise(mni, "on")
    assert "contrast-enhanced (gadolinium) T1" in str(info.value) and "a T1's order of intensities" in str(info.value)


def test_t2_like_contrast_is_rejected(mni):
    _, brain, labels, grid, _, _ = _template()
    img = mni.data / np.percentile(mni.data[mni.data > 0], 99)
    inside = mni.data > 0.01 * mni.data.max()
    # T2-like: CSF bright, white matter dark (intensities inverted inside the brain, ventricles bright)
    t2 = np.where(inside, 1.3 - img, 0.0).astype(np.float32)
    with pytest.raises(NotT1Error, match="T1 contrast"):
        localise(Volume(t2, mni.affine), "on")
    # FLAIR-like: CSF stays dark but grey matter is brighter than white matter
    _, _, t_labels, _, _, _ = _template()
    flair = img.copy()
    wm = np.isin(labels, (2, 41))
    flair = np.where(inside, np.where(img > 0.75, 1.5 - img, img), 0.0).astype(np.float32)
    with pytest.raises(NotT1Error, match="T1 contrast"):
        localise(Volume(flair, mni.affine), "on")


def test_map_back_is_exact_on_the_same_grid_and_keeps_volumes_on_a_coarser_one():
    _, _, _, grid, _, _ = _template()
    roi = (slice(60, 120), slice(80, 150), slice(50, 100))
    classes = np.zeros(tuple(s.stop - s.start for s in roi), np.uint8)
    classes[6:30, 10:40, 10:34] = 1
    classes[34:58, 20:50, 14:38] = 5
    probs = np.stack([(classes == c).astype(np.float32) for c in range(9)])
    loc = Localisation("on", True, "test", np.eye(4), grid=grid)
    same = map_back(probs, roi, loc, Volume(np.zeros(grid.shape, np.float32), grid.affine))
    expected = np.zeros(grid.shape, np.uint8)
    expected[roi] = classes
    assert np.array_equal(same, expected)
    # a 2 mm input grid placed with a rigid transform: volumes (voxels x 8 mm^3) stay within 5 %
    truth = _rigid((0, 10, 0), (3.0, -2.0, 50.0))
    coarse_aff = truth @ grid.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    coarse = Volume(np.zeros(tuple(s // 2 for s in grid.shape), np.float32), coarse_aff)
    loc = Localisation("on", True, "test", truth, grid=grid)
    out = map_back(probs, roi, loc, coarse)
    for c in (1, 5):
        assert abs((out == c).sum() * 8.0 / (classes == c).sum() - 1) < 0.05, c


def test_cli_refuses_an_image_without_a_brain(tmp_path, weights_dir, capsys):
    from basalseg.commands import main

    import nibabel as nib

    rng = np.random.default_rng(3)
    path = tmp_path / "noise.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((150, 170, 150)).astype(np.float32), np.eye(4)), str(path))
    out = tmp_path / "out"
    rc = main(["segment", str(path), "--out", str(out), "--weights", str(weights_dir), "--progress", "none"])
    assert rc == 2
    assert "no brain found" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_whole_head_and_skull_stripped_brain_agree():
    """A head-like subject (1.4-1.5 mm voxels, posed, off-origin) and the same brain skull-stripped on
    the same grid, both segmented with the command line's defaults: the two labelmaps agree (issue
    11's criterion, Dice >= 0.95 between the two outputs; run by default since 2026-12-06, about
    1.5 min on 2 cores, so that CI checks it with every change to the shipped weights). Both are
    localised (``auto`` localises every whole brain since 2026-12-07; before 2026-12-03 a turned
    skull-stripped brain was segmented in its pose and the two agreed at a mean Dice of 0.840)."""
    from basalseg.data.head import HeadConfig, brain_config_for_heads, synthesize_head
    from basalseg.data.synth import SynthConfig, prepare_source
    from basalseg.pipeline import Pipeline, PipelineConfig
    from basalseg.structures import STRUCTURES

    cfg = SynthConfig()
    src = prepare_source(atlas.load_template("mni152"), atlas.load_reference_labels("mni152", "dk", full=True),
                         brain_config_for_heads(cfg), name="mni152")
    subject = synthesize_head(src, 424242, cfg, HeadConfig(spacing_mm=(1.4, 1.5), thick_slice_prob=0.0, rotation_deg=15.0))
    head = subject.image
    stripped = Volume(np.where(subject.brain_mask, head.data, 0.0).astype(np.float32), head.affine)
    pipe = Pipeline(PipelineConfig(threads=2, localise="auto"))
    a = pipe.segment(head)
    b = pipe.segment(stripped)
    assert a.provenance["localisation"]["applied"] and b.provenance["localisation"]["applied"]
    dices = []
    for s in STRUCTURES:
        pa, pb = a.labels == s.label, b.labels == s.label
        dices.append(2 * (pa & pb).sum() / max(pa.sum() + pb.sum(), 1))
    print("head vs skull-stripped Dice per structure:", np.round(dices, 3), "mean", round(float(np.mean(dices)), 4))
    assert float(np.mean(dices)) >= 0.95, dices


def test_scan_flags_name_implausible_asymmetric_and_disagreeing_results():
    from basalseg.scan_qc import scan_flags
    from basalseg.structures import STRUCTURES

    labels = np.zeros((60, 60, 60), np.int16)
    sizes = {"thalamus": 8000, "caudate": 4000, "putamen": 5000, "pallidum": 1500}
    flat = labels.reshape(-1)
    start = 0
    for s in STRUCTURES:
        n = sizes[s.key.split("_", 1)[1]]
        if s.key == "right_putamen":
            n = 2500  # 67 % asymmetry
        flat[start:start + n] = s.label
        start += n
    flags = scan_flags(labels, 1.0, [], {"left_thalamus": 0.9, "left_caudate": 0.5})
    kinds = {(f["kind"], f["structure"]) for f in flags}
    assert ("asymmetry", "putamen") in kinds and ("disagreement", "left_caudate") in kinds
    assert not any(k == "implausible" for k, _ in kinds)
    assert not any(s == "left_thalamus" for _, s in kinds)
    # the same labels read with a 10x too large voxel volume (a wrong header): implausible
    # the pallidi's threshold is 0.15 lower (their masks agree less on good results too)
    dis = {f["structure"] for f in scan_flags(labels, 1.0, [], {"left_pallidum": 0.65, "right_pallidum": 0.5,
                                                                 "right_caudate": 0.65}) if f["kind"] == "disagreement"}
    assert dis == {"right_pallidum", "right_caudate"}
    assert any(f["kind"] == "implausible" for f in scan_flags(labels, 10.0, [], {}))
    from basalseg.inputcheck import thick_slice_flags

    assert thick_slice_flags([1.0, 1.2, 3.0]) == []
    (thick,) = thick_slice_flags([0.45, 6.0, 0.45])
    assert thick["kind"] == "thick_slices" and "6.0 mm voxels along voxel axis 1" in thick["message"]
    assert any(f["kind"] == "missing" for f in scan_flags(labels, 1.0, ["left_pallidum"], {}))
