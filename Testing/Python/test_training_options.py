"""Training options for fine-tuning: the student's left-right mirror augmentation, its elastic
deformation and ``--split`` (validating a fine-tuned network on an earlier run's validation cases)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from basalseg.errors import BasalSegError
from basalseg.structures import NUM_CLASSES, STRUCTURES, get_structure, left_right_permutation
from basalseg.training.train_student import mirror_left_right, student_transforms


def test_left_right_permutation_pairs_every_structure_with_its_twin():
    perm = left_right_permutation()
    assert perm[0] == 0 and sorted(perm) == list(range(NUM_CLASSES))
    for s in STRUCTURES:
        twin = STRUCTURES[perm[s.class_index] - 1]
        assert twin.key != s.key and twin.key.split("_", 1)[1] == s.key.split("_", 1)[1]
        assert perm[perm[s.class_index]] == s.class_index


def test_mirror_moves_a_left_structure_to_the_right_with_its_prior_channel():
    left, right = get_structure("left_putamen"), get_structure("right_putamen")
    x = np.zeros((NUM_CLASSES, 10, 4, 3), np.float32)
    y = np.zeros((10, 4, 3), np.uint8)
    x[0, :, 1, 1] = np.arange(10)  # the T1 ramps along left-right
    x[left.class_index, 2, 1, 1] = 1.0  # the left putamen's prior at i = 2
    y[2, 1, 1] = left.class_index
    mx, my = mirror_left_right(x, y)
    assert mx.shape == x.shape and my.dtype == np.uint8 and mx.flags.c_contiguous
    np.testing.assert_array_equal(mx[0, :, 1, 1], np.arange(10)[::-1])
    assert my[7, 1, 1] == right.class_index and np.count_nonzero(my) == 1
    assert mx[right.class_index, 7, 1, 1] == 1.0 and mx[left.class_index].sum() == 0
    back_x, back_y = mirror_left_right(mx, my)  # an involution
    np.testing.assert_array_equal(back_x, x)
    np.testing.assert_array_equal(back_y, y)


def test_mirror_of_a_t1_only_input_and_a_wrong_channel_count():
    x = np.random.default_rng(0).random((1, 5, 2, 2)).astype(np.float32)
    mx, _ = mirror_left_right(x, np.zeros((5, 2, 2), np.uint8))
    np.testing.assert_array_equal(mx, x[:, ::-1])
    with pytest.raises(ValueError, match="channels"):
        mirror_left_right(np.zeros((3, 5, 2, 2), np.float32), np.zeros((5, 2, 2), np.uint8))


def _blob_sample(side=40):
    """Two spheres (classes 1 and 2) with the T1 and a prior channel per class that equal the labels."""
    g = np.indices((side,) * 3).astype(np.float32)
    label = np.zeros((side,) * 3, np.uint8)
    label[((g - np.array([14, 20, 20])[:, None, None, None]) ** 2).sum(0) < 7 ** 2] = 1
    label[((g - np.array([27, 20, 20])[:, None, None, None]) ** 2).sum(0) < 5 ** 2] = 2
    prior = np.stack([(label == c).astype(np.float32) for c in range(1, NUM_CLASSES)])
    return {"image": (label > 0).astype(np.float32)[None], "prior": prior, "label": label[None].astype(np.float32)}


def test_elastic_deformation_moves_labels_image_and_prior_together():
    """``--elastic 1``: the structures change shape and volume, and the T1 and the prior channels move with
    the labels (a voxel inside a deformed structure is still inside it on every channel)."""
    changed, moved, unmoved = [], [], []
    dice = lambda a, b: 2 * (a & b).sum() / (a.sum() + b.sum())
    for seed in range(4):
        sample = _blob_sample()
        out = student_transforms(seed, True, (40, 40, 40), elastic=1.0)(dict(sample))
        label = np.asarray(out["label"])[0].round()
        image, prior = np.asarray(out["image"])[0], np.asarray(out["prior"])
        inside = label == 1
        assert inside.sum() > 100
        moved.append(dice(prior[0] > 0.5, inside))
        unmoved.append(dice(sample["prior"][0] > 0.5, inside))
        # labels are resampled nearest, the prior linearly: they differ only on the rim
        assert dice(prior[0] > 0.5, inside) > 0.9 and dice(prior[1] > 0.5, label == 2) > 0.85
        # the T1 also had gamma and noise (intensity only)
        assert dice(image > 0.5, label > 0) > 0.85
        changed.append(np.abs((label == 1).sum() / (sample["label"][0] == 1).sum() - 1))
    assert max(changed) > 0.02  # the shapes did change
    assert np.mean(moved) > np.mean(unmoved) + 0.05  # and the prior followed them


def test_elastic_off_by_default_and_its_probability_checked():
    names = [type(t).__name__ for t in student_transforms(0, True).transforms]
    assert "Rand3DElasticd" not in names
    assert "Rand3DElasticd" in [type(t).__name__ for t in student_transforms(0, True, elastic=0.5).transforms]
    with pytest.raises(ValueError, match="elastic"):
        student_transforms(0, True, elastic=1.5)


def test_probability_options_are_checked_when_parsed(capsys):
    """``train --elastic/--mirror`` and ``synth --artefacts`` take probabilities: anything else is a usage error
    before any cohort is read."""
    from basalseg.commands.app import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "--cohort", "c", "--work", "w", "--elastic", "0.5"]).elastic == 0.5
    for argv in (["train", "--cohort", "c", "--work", "w", "--elastic", "1.5"],
                 ["train", "--cohort", "c", "--work", "w", "--mirror", "-0.1"],
                 ["synth", "--out", "o", "--artefacts", "often"]):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv)
        assert info.value.code == 2 and "probability" in capsys.readouterr().err


def _tiny_cohort(folder, names):
    """A cohort folder in the nnU-Net layout with 16^3 cases (T1 ramp, two structures)."""
    import nibabel as nib

    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for n, name in enumerate(names):
        image = np.linspace(0, 1, 16 ** 3, dtype=np.float32).reshape((16,) * 3) + 0.01 * n
        labels = np.zeros((16,) * 3, np.int16)
        labels[3:6, 5:9, 5:9] = get_structure("left_putamen").label
        labels[10:13, 5:9, 5:9] = get_structure("right_putamen").label
        nib.save(nib.Nifti1Image(image, np.eye(4)), folder / "imagesTr" / f"{name}_0000.nii.gz")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), folder / "labelsTr" / f"{name}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "numTraining": len(names),
                                                     "file_ending": ".nii.gz",
                                                     "labels": {"background": 0}}))


def test_split_keeps_an_earlier_runs_validation_cases(tmp_path):
    from basalseg.training.run import train

    cohort = tmp_path / "cohort"
    _tiny_cohort(cohort, ["c0", "c1", "c2", "c3"])
    earlier = tmp_path / "earlier_split.json"
    earlier.write_text(json.dumps({"train": ["c0", "c1"], "val": ["c3"]}))
    kwargs = dict(label_mapping=None, stage="prepare", val=2, foundation="litemedsam", checkpoint=None, device="cpu",
                  threads=1, prompter_steps=1, student_steps=1, steps_per_epoch=1, lr=1e-3, max_minutes=None,
                  mode="sdm", band=5.0, jitter=0, shard="0/1", boundary_weight=0.5, patch=16, seed=0, resume=False,
                  export=None)
    train([cohort], tmp_path / "work", split=earlier, **kwargs)
    written = json.loads((tmp_path / "work" / "split.json").read_text())
    assert written == {"train": ["c0", "c1", "c2"], "val": ["c3"]}  # c2, new in the cohort, is trained on
    train([cohort], tmp_path / "work_default", **kwargs)  # without --split: --val 2 of the seeded shuffle
    assert len(json.loads((tmp_path / "work_default" / "split.json").read_text())["val"]) == 2
    earlier.write_text(json.dumps({"val": ["c3", "gone"]}))
    with pytest.raises(BasalSegError, match="gone"):
        train([cohort], tmp_path / "work2", split=earlier, **kwargs)
    earlier.write_text("not json")
    with pytest.raises(BasalSegError, match="split"):
        train([cohort], tmp_path / "work3", split=earlier, **kwargs)


def test_describe_cohort_records_head_localisation_and_artefacts(tmp_path):
    from basalseg.training.run import describe_cohort

    def cohort(name, synth, localised=None):
        folder = tmp_path / name
        folder.mkdir()
        data = {"numTraining": 3, "basalseg_synth": synth}
        if localised is not None:
            data["basalseg_localised"] = localised
        (folder / "dataset.json").write_text(json.dumps(data))
        return folder

    cases = [{"template": "mni152", "atlas": "dk"}, {"template": "icbm2009c", "atlas": "dk"}]
    stripped = describe_cohort(cohort("stripped", {"generator_version": 1, "cohort_seed": 7, "cases": cases,
                                                    "config": {"contrast": "t1_gmm"}}))
    assert stripped["head"] is False and "localised" not in stripped and stripped["templates"] == ["icbm2009c", "mni152"]
    head = describe_cohort(cohort("head", {"generator_version": 1, "cohort_seed": 8, "cases": cases,
                                           "config": {"contrast": "template"}, "head_generator_version": 1,
                                           "head": {"artefact_prob": 0.7, "skull_stripped": False}},
                                  {"function": "basalseg.localise.localise(mode='on')", "n_dropped": 1}))
    assert head["head"] is True and head["artefact_prob"] == 0.7 and head["skull_stripped"] is False
    assert head["localised"] == {"function": "basalseg.localise.localise(mode='on')", "dropped": 1, "transform": "rigid"}
    affine = describe_cohort(cohort("affine", {"generator_version": 1, "cohort_seed": 9, "cases": cases},
                                    {"function": "basalseg.localise.localise(mode='on')", "n_dropped": 0,
                                     "transform": "affine"}))
    assert affine["localised"]["transform"] == "affine"
    assert head["cohort_seed"] == 8 and head["contrast"] == "template" and head["cases"] == 3


def test_a_cohort_replaced_under_the_same_case_names_is_prepared_again(tmp_path, monkeypatch):
    """Prepared cases are keyed by their source files' content, not by case name: a cohort folder
    regenerated with other images (same names) must not be trained on or scored with the previous
    arrays; the same bytes under a new time stamp are reused."""
    import os

    import nibabel as nib

    import basalseg.training.prepare as prep
    from basalseg.data.cohort import read_cohort
    from basalseg.training.prepare import load_prepared, prepare_cases

    cohort = tmp_path / "cohort"
    _tiny_cohort(cohort, ["c0", "c1"])
    made = []
    real = prep.prepare_case
    monkeypatch.setattr(prep, "prepare_case", lambda case: made.append(case.name) or real(case))
    work = tmp_path / "work"
    paths = prepare_cases(read_cohort(cohort), work)
    assert made == ["c0", "c1"]
    first = load_prepared(paths[0]).image01.copy()
    prepare_cases(read_cohort(cohort), work)
    assert made == ["c0", "c1"]  # resumed: nothing prepared twice
    image_path = cohort / "imagesTr" / "c0_0000.nii.gz"
    os.utime(image_path, (1, 1))  # the same bytes, another time stamp: still reused
    prepare_cases(read_cohort(cohort), work)
    assert made == ["c0", "c1"]
    # c0 regenerated: another image under the same name
    nib.save(nib.Nifti1Image(np.full((16,) * 3, 0.5, np.float32) + np.eye(16)[:, :, None], np.eye(4)), image_path)
    prepare_cases(read_cohort(cohort), work)
    assert made == ["c0", "c1", "c0"]
    assert not np.array_equal(load_prepared(paths[0]).image01, first)
    # another label mapping is another source too
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"12": 12, "51": 0}))
    prepare_cases(read_cohort(cohort, mapping), work)
    assert made[3:] == ["c0", "c1"]
    assert not (load_prepared(paths[1]).classes == get_structure("right_putamen").class_index).any()
    # a file from before sources were recorded is prepared again
    with np.load(paths[1]) as data:
        legacy = {k: data[k] for k in data.files if k != "source"}
    np.savez_compressed(paths[1], **legacy)
    prepare_cases(read_cohort(cohort, mapping), work)
    assert made[5:] == ["c1"]
