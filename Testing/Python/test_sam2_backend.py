"""SAM2Backend with the real sam2 package: a randomly initialised Hiera-T on CPU (no download).

Random weights make the masks meaningless; these tests check shapes, prompt plumbing and the
error paths. The model is built once per module (~1 s) and one slice is encoded (~4-7 s on
2 CPU cores).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sam2")

from basalseg.catalogue import UnknownModelError  # noqa: E402
from basalseg.errors import BackendUnavailableError, CheckpointError  # noqa: E402
from basalseg.foundation import FoundationBackend, make_backend  # noqa: E402
from basalseg.foundation.sam2_backend import SAM2Backend, infer_config  # noqa: E402

TINY = "configs/sam2.1/sam2.1_hiera_t.yaml"


@pytest.fixture(scope="module")
def backend():
    return SAM2Backend(config=TINY, random_init=True, device="cpu")


@pytest.fixture(scope="module")
def encoded(backend):
    rng = np.random.default_rng(0)
    image = rng.random((64, 80), dtype=np.float32)
    image[20:40, 25:55] += 0.5
    backend.set_image(np.clip(image, 0, 1))
    return backend


def test_protocol_and_describe(backend):
    assert isinstance(backend, FoundationBackend)
    assert backend.name == "sam2" and backend.native_size == 1024
    info = backend.describe()
    assert info["random_init"] is True and info["checkpoint"] is None and info["config"] == TINY
    assert info["backend"] == "sam2" and info["device"] == "cpu"


def test_predict_batched_boxes_with_padded_points(encoded):
    boxes = np.array([[10, 10, 40, 40], [25, 20, 55, 40], [0, 0, 79, 63]], dtype=np.float32)
    points = np.array([[[20, 20], [30, 30]], [[40, 30], [-5, 999]], [[5, 5], [70, 60]]], dtype=np.float32)
    labels = np.array([[1, 0], [1, -1], [1, 1]])  # second prompt has one point, padded with -1
    masks = encoded.predict(boxes, points, labels)
    assert masks.shape == (3, 64, 80) and masks.dtype == bool

    # batching does not mix prompts: one prompt alone gives the same mask
    alone = encoded.predict(boxes[2:], points[2:], labels[2:])
    assert alone.shape == (1, 64, 80) and np.array_equal(alone[0], masks[2])
    # box-only prompts and an empty prompt list
    assert encoded.predict(boxes).shape == (3, 64, 80)
    assert encoded.predict(np.zeros((0, 4))).shape == (0, 64, 80)


def test_padding_columns_shared_by_all_prompts_are_ignored(encoded):
    boxes = np.array([[10, 10, 40, 40], [25, 20, 55, 40]], dtype=np.float32)
    points = np.array([[[20, 20]], [[40, 30]]], dtype=np.float32)
    labels = np.ones((2, 1), dtype=np.int64)
    padded_points = np.concatenate([points, np.full((2, 2, 2), 7.0, np.float32)], axis=1)
    padded_labels = np.concatenate([labels, -np.ones((2, 2), np.int64)], axis=1)
    assert np.array_equal(encoded.predict(boxes, points, labels), encoded.predict(boxes, padded_points, padded_labels))


def test_bad_prompts_are_value_errors(encoded):
    boxes = np.array([[10, 10, 40, 40]], dtype=np.float32)
    with pytest.raises(ValueError, match="point_labels"):
        encoded.predict(boxes, np.zeros((1, 1, 2)), np.array([[2]]))
    with pytest.raises(ValueError, match="points"):
        encoded.predict(boxes, np.zeros((2, 1, 2)), np.ones((2, 1)))
    with pytest.raises(ValueError, match="finite"):
        encoded.predict(np.array([[np.nan, 0, 4, 4]]))
    with pytest.raises(ValueError, match="2D"):
        encoded.set_image(np.zeros((4, 4, 4), np.float32))  # (H, W, 3) is the 3-slice context, accepted


def test_predict_before_set_image(backend):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    fresh = copy.copy(backend)  # same model, a predictor with no image: avoids a second build
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        fresh.predictor = SAM2ImagePredictor(backend.model)
    fresh._image_hw = None
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict(np.array([[1, 1, 5, 5]], dtype=np.float32))


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "sam2.1_hiera_tiny.pt"
    bad.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as info:
        SAM2Backend(checkpoint=bad, device="cpu")
    assert "\n" not in str(info.value)


def test_wrong_keys_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"model": {"encoder.weight": torch.zeros(2, 2), "decoder.bias": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="missing keys") as info:
        SAM2Backend(checkpoint=path, config=TINY, device="cpu")
    assert "unexpected keys" in str(info.value) and "\n" not in str(info.value)

    torch.save({"optimizer": [1, 2, 3]}, path)
    with pytest.raises(CheckpointError, match="not a SAM-2 checkpoint"):
        SAM2Backend(checkpoint=path, config=TINY, device="cpu")


def test_wrong_size_checkpoint(backend, tmp_path):
    state = {k: v.clone() for k, v in backend.model.state_dict().items()}
    state["sam_mask_decoder.iou_token.weight"] = torch.zeros(1, 3)
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="size mismatch") as info:
        SAM2Backend(checkpoint=path, device="cpu")  # config inferred from the file name
    assert "\n" not in str(info.value)


def test_real_state_dict_round_trips(backend, tmp_path):
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": backend.model.state_dict()}, path)
    loaded = SAM2Backend(checkpoint=path, device="cpu")
    info = loaded.describe()
    assert info["checkpoint"] == str(path) and len(info["checkpoint_sha256"]) == 64
    assert info["config"] == TINY and info["random_init"] is False


def test_checkpoint_name_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("BASALSEG_CACHE", str(tmp_path))
    with pytest.raises(BackendUnavailableError, match="needs a checkpoint.*sam2.1_hiera_tiny"):
        SAM2Backend(device="cpu")
    with pytest.raises(UnknownModelError, match="sam2.1_hiera_tiny") as info:
        SAM2Backend(checkpoint="sam2.1_hiera_giant", device="cpu")
    assert isinstance(info.value, CheckpointError)
    with pytest.raises(CheckpointError, match="not found"):
        SAM2Backend(checkpoint=str(tmp_path / "nope" / "model.pt"), device="cpu")
    monkeypatch.setenv("BASALSEG_OFFLINE", "1")
    with pytest.raises(BackendUnavailableError, match="offline"):
        make_backend("sam2", checkpoint="sam2.1_hiera_tiny", device="cpu")


def test_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="config"):
        SAM2Backend(config="configs/sam2.1/sam2.1_hiera_xxl.yaml", random_init=True, device="cpu")
    with pytest.raises(ValueError, match="threshold"):
        SAM2Backend(random_init=True, threshold="high", device="cpu")
    with pytest.raises(ValueError, match="random_init"):
        SAM2Backend(checkpoint="sam2.1_hiera_tiny", random_init=True, device="cpu")
    odd = tmp_path / "my_weights.pt"
    torch.save({"model": {"x": torch.zeros(1)}}, odd)
    with pytest.raises(ValueError, match="config is required"):
        SAM2Backend(checkpoint=odd, device="cpu")


def test_infer_config():
    assert infer_config("/x/sam2.1_hiera_base_plus.pt") == "configs/sam2.1/sam2.1_hiera_b+.yaml"
    assert infer_config("sam2_hiera_large.pt") == "configs/sam2/sam2_hiera_l.yaml"
    assert infer_config("other.pt") is None
