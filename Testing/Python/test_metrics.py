"""The one Dice (basalseg.metrics) and its empty-mask rule, as every caller uses it."""

from __future__ import annotations

import numpy as np
import pytest

from basalseg.metrics import dice, dice_per_class


def test_dice_values_and_empty_rule():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    assert dice(a, b) == 1.0 and dice(a, b, empty=None) is None
    a[0, 0, :2] = True
    assert dice(a, b) == 0.0
    b[0, 0, 1:3] = True
    assert dice(a, b) == pytest.approx(2 * 1 / 4)
    with pytest.raises(ValueError, match="different shapes"):
        dice(a, b[:2])


def test_callers_agree_with_the_one_dice():
    from basalseg.evaluation import structure_metrics
    from basalseg.metrics import foundation_student_dice
    from basalseg.training.train_prompter import dice_per_class as prompter_dice

    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, (6, 6, 5))
    ref = rng.integers(0, 3, (6, 6, 5))
    per_class = dice_per_class(pred, ref, 3)
    assert np.allclose(prompter_dice(pred, ref, 3), per_class)
    assert structure_metrics(pred == 1, ref == 1)["dice"] == pytest.approx(per_class[0])
    assert structure_metrics(pred == 9, ref == 9)["dice"] == 1.0  # both empty

    from basalseg.prompts import Prompt, PromptSet
    from basalseg.spatial import Grid

    masks = np.zeros((8, 6, 6, 5), bool)
    masks[0] = ref == 1
    prompts = PromptSet(grid=Grid((6, 6, 5), np.eye(4)), prompts=[Prompt("left_thalamus", k, [0, 0, 5, 5]) for k in range(5)])
    from basalseg.structures import STRUCTURES

    key = STRUCTURES[0].key
    classes = np.where(pred == 1, STRUCTURES[0].class_index, 0)
    got = foundation_student_dice(masks, classes, prompts)
    assert got[key] == pytest.approx(round(dice(ref == 1, pred == 1), 4))
    assert all(v is None for k, v in got.items() if k != key)  # no prompts: no evidence


def test_volume_agreement_slope_r_and_signed_error():
    from basalseg.evaluation import volume_agreement
    from basalseg.structures import STRUCTURES

    name = STRUCTURES[0].name
    ref = [8.0, 10.0, 12.0, 14.0]
    shrunk = [0.5 * (v - 11.0) + 11.0 for v in ref]  # differences read at half their size
    rows = [{"structure": name, "volume_ref_ml": r, "volume_pred_ml": p} for r, p in zip(ref, shrunk)]
    rows.append({"structure": name, "volume_ref_ml": 0.0, "volume_pred_ml": 1.0})  # no reference: skipped
    biased = [{"structure": STRUCTURES[1].name, "volume_ref_ml": r, "volume_pred_ml": 1.1 * r} for r in ref]
    out = volume_agreement(rows + biased)
    a = out[name]
    assert a["n"] == 4 and abs(a["slope"] - 0.5) < 1e-9 and abs(a["r"] - 1.0) < 1e-9
    assert abs(a["signed_error_pct"] - np.mean([100 * (p / r - 1) for r, p in zip(ref, shrunk)])) < 1e-9
    b = out[STRUCTURES[1].name]
    assert abs(b["slope"] - 1.1) < 1e-9 and abs(b["signed_error_pct"] - 10.0) < 1e-9 and b["signed_error_sd_pct"] < 1e-9
    empty = out[STRUCTURES[2].name]
    assert empty["n"] == 0 and np.isnan(empty["slope"]) and np.isnan(empty["signed_error_pct"])
    assert np.isnan(a["local_slope"])  # no affine_scale on the rows


def test_local_slope_takes_out_the_localisation_scale():
    """Each case's volumes = its affine scale x the structure's own size relative to the brain; a prediction
    that carries the scale exactly but reads the own size at 60 % has local slope 0.6, while its plain
    slope is near 1 because the scale dominates."""
    from basalseg.evaluation import volume_agreement
    from basalseg.structures import STRUCTURES

    name = STRUCTURES[0].name
    scales = [0.8, 1.0, 1.25, 0.9, 1.1]
    own = [1.05, 0.95, 1.0, 1.1, 0.92]
    rows = [{"structure": name, "affine_scale": s, "volume_ref_ml": 10 * s * o, "volume_pred_ml": 10 * s * o ** 0.6}
            for s, o in zip(scales, own)]
    a = volume_agreement(rows)[name]
    assert abs(a["local_slope"] - 0.6) < 1e-9 and a["slope"] > 0.8
    rows[0]["affine_scale"] = None  # one case without a localisation scale: undefined
    assert np.isnan(volume_agreement(rows)[name]["local_slope"])


def test_evaluate_files_names_how_the_grids_differ(tmp_path):
    """``basalseg evaluate`` on files: the same grid scores; an origin moved 500 mm is named as
    such (not as two equal shapes) and refused unless ``resample``; another shape is named too."""
    from conftest import write_nifti

    from basalseg.errors import InputImageError
    from basalseg.evaluation import evaluate_files

    labels = np.zeros((20, 20, 20), np.int16)
    labels[5:12, 5:12, 5:12] = 12  # Left-Putamen
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    ref = write_nifti(tmp_path / "ref.nii.gz", labels, affine)
    rows = evaluate_files(write_nifti(tmp_path / "same.nii.gz", labels, affine), ref)
    putamen = [r for r in rows if r["structure"] == "Left-Putamen"][0]
    assert putamen["dice"] == 1.0
    moved = affine.copy()
    moved[:3, 3] = 500.0
    shifted = write_nifti(tmp_path / "moved.nii.gz", labels, moved)
    with pytest.raises(InputImageError, match=r"origins differ by 866\.0 mm"):
        evaluate_files(shifted, ref)
    other = write_nifti(tmp_path / "other.nii.gz", labels[:18], affine)
    with pytest.raises(InputImageError, match=r"shapes \(18, 20, 20\) vs \(20, 20, 20\)"):
        evaluate_files(other, ref)
    rows = evaluate_files(shifted, ref, resample=True)  # 500 mm away: nothing overlaps any more
    assert [r for r in rows if r["structure"] == "Left-Putamen"][0]["dice"] == 0.0
