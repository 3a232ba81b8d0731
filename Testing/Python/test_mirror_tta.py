"""Left-right test-time augmentation of the student (``predict_student(mirror=True)``,
``segment --mirror-tta``): the mirrored pass is mapped back onto the crop, and the averaged
prediction is left-right equivariant for any network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from basalseg.structures import NUM_CLASSES, left_right_permutation
from basalseg.student import mirror_input, predict_student, unmirror_classes


class _Pointwise(torch.nn.Module):
    """logits = 4 * input channels: commutes with a mirror, so the TTA mean equals the plain pass."""

    def forward(self, x):
        return 4.0 * x


def _conv_net(seed: int = 0) -> torch.nn.Module:
    """A small random 3D convolution: not symmetric, so the mirrored pass differs from the plain one."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv3d(NUM_CLASSES, 12, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Conv3d(12, NUM_CLASSES, 3, padding=1))
    return net.eval()


def _inputs(shape=(20, 18, 16), seed=1):
    return np.random.default_rng(seed).random((NUM_CLASSES,) + shape).astype(np.float32)


def test_mirror_input_swaps_left_and_right_channels_and_reverses_axis_0():
    x = _inputs()
    m = mirror_input(x)
    perm = left_right_permutation()
    assert m.shape == x.shape and m.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(m[0], x[0, ::-1])
    for c in range(1, NUM_CLASSES):
        np.testing.assert_array_equal(m[c], x[perm[c], ::-1])
    np.testing.assert_array_equal(mirror_input(m), x)  # an involution
    t1 = x[:1]
    np.testing.assert_array_equal(mirror_input(t1), t1[:, ::-1])  # T1 only: no channel swap
    back = unmirror_classes(torch.from_numpy(mirror_input(x)))
    np.testing.assert_array_equal(back.numpy(), x)


def test_mirror_tta_of_a_pointwise_net_is_the_plain_pass():
    x = _inputs()
    plain = predict_student(_Pointwise(), x, "cpu", return_logits=True)
    tta = predict_student(_Pointwise(), x, "cpu", return_logits=True, mirror=True)
    np.testing.assert_allclose(tta, plain, atol=1e-5)


def test_mirror_tta_is_the_mean_of_the_plain_and_the_mapped_back_mirrored_pass():
    net, x = _conv_net(), _inputs()
    plain = predict_student(net, x, "cpu", return_logits=True)
    mirrored = predict_student(net, mirror_input(x), "cpu", return_logits=True)
    expected = 0.5 * (plain + mirrored[left_right_permutation()][:, ::-1])
    tta = predict_student(net, x, "cpu", return_logits=True, mirror=True)
    assert np.abs(tta - plain).max() > 1e-3, "the test network must not be mirror-symmetric"
    np.testing.assert_allclose(tta, expected, atol=1e-5)


def test_mirror_tta_prediction_is_left_right_equivariant():
    """Segmenting the mirrored crop gives the mirror of the crop's segmentation, left and right
    swapped, which no single pass of an asymmetric network does."""
    net, x = _conv_net(3), _inputs(seed=4)
    perm = np.array(left_right_permutation(), np.uint8)
    v = np.linspace(-0.3, 0.3, NUM_CLASSES).astype(np.float32)
    offsets = v + v[perm]  # the same offset for a structure and its twin (else the mirror changes them)
    a = predict_student(net, x, "cpu", mirror=True, logit_offsets=offsets)
    b = predict_student(net, mirror_input(x), "cpu", mirror=True, logit_offsets=offsets)
    np.testing.assert_array_equal(perm[b][::-1], a)
    a1 = predict_student(net, x, "cpu")
    b1 = predict_student(net, mirror_input(x), "cpu")
    assert not np.array_equal(perm[b1][::-1], a1)


@pytest.mark.parametrize("argv, expected", [([], True), (["--mirror-tta"], True), (["--no-mirror-tta"], False)])
def test_cli_mirror_tta_flag(argv, expected):
    """On by default wherever the student runs: segment, batch, evaluate-cohort, calibrate."""
    from basalseg.commands import build_parser
    from basalseg.commands.options import pipeline_config

    for command in (["segment", "x.nii.gz"], ["batch", "in_dir"]):
        args = build_parser().parse_args([*command, "--out", "o", *argv])
        assert pipeline_config(args).mirror_tta is expected
    common = ["--cohort", "c", "--work", "w", "--prompter", "p"]
    assert build_parser().parse_args(["evaluate-cohort", *common, "--out", "o", *argv]).mirror_tta is expected
    assert build_parser().parse_args(["calibrate", *common, "--student", "s", "--out", "o", *argv]).mirror_tta is expected


def test_pipeline_records_mirror_tta_and_changes_only_the_student(small_t1, small_prompts_path, weights_dir):
    from test_cli import _BoxFill

    from basalseg.imageio import load_volume
    from basalseg.pipeline import Pipeline, PipelineConfig
    from basalseg.prompts import load_prompts

    runs = {}
    for tta in (False, True):
        pipe = Pipeline(PipelineConfig(weights_dir=str(weights_dir), device="cpu", mirror_tta=tta), backend=_BoxFill())
        runs[tta] = pipe.segment(load_volume(small_t1.path), prompts=load_prompts(small_prompts_path))
    assert runs[True].provenance["options"]["mirror_tta"] is True
    assert runs[False].provenance["options"]["mirror_tta"] is False
    np.testing.assert_array_equal(runs[True].masks.crop(runs[True].roi), runs[False].masks.crop(runs[False].roi))
    assert runs[True].labels.shape == runs[False].labels.shape


def test_flip_diagnostic_compares_two_single_passes_whether_or_not_the_output_is_the_tta_mean():
    """``uncertainty="flip"``: ``flip_half_diff_ml`` is half the volume difference between the mirrored
    and the unmirrored single pass, also when the labelmap itself is the TTA mean."""
    from types import SimpleNamespace

    from basalseg.pipeline import Pipeline
    from basalseg.structures import STRUCTURES
    from basalseg.uncertainty import flip_probabilities

    net, x = _conv_net(3), _inputs(seed=4)
    grid = SimpleNamespace(affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    plain = predict_student(net, x, "cpu")
    flipped = flip_probabilities(net, x, "cpu").argmax(0)
    tta = predict_student(net, x, "cpu", mirror=True)
    assert any(np.count_nonzero(tta == c) != np.count_nonzero(plain == c) for c in range(1, NUM_CLASSES))
    for mirror in (True, False):
        classes, probs = predict_student(net, x, "cpu", return_probabilities=True, mirror=mirror)
        me = SimpleNamespace(config=SimpleNamespace(mirror_tta=mirror), device="cpu")
        rec = Pipeline._uncertainty(me, net, x, probs, classes, [], grid, None, "flip")
        for s in STRUCTURES:
            entry = rec["measures"][s.name]
            v_plain, v_flip = np.count_nonzero(plain == s.class_index), np.count_nonzero(flipped == s.class_index)
            assert entry["flip_ml"] == pytest.approx(v_flip / 1000.0)
            assert entry["flip_half_diff_ml"] == pytest.approx(0.5 * abs(v_flip - v_plain) / 1000.0)
