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
