"""Train the student on [T1, SDM] crops from the foundation cache.

Inputs per case come from :mod:`basalseg.training.foundation_cache` (the frozen foundation
model is never rerun here). The SDM channels are computed once per case for the chosen band
and input mode (:func:`basalseg.student.build_student_input`), so the ablations "T1 only",
"T1 + raw masks" and "T1 + SDM with band 5/10/20" are the same code with another ``mode`` or
``band``.

Each step: one case, padded to at least ``patch``^3 and cut to a random ``patch``^3 window
(96 by default, the inference window), then MONAI
augmentations — ``RandAffined`` on image, prior channels and labels together (rotation up to
0.15 rad, scaling +-10%; labels nearest), ``RandAdjustContrastd`` (gamma 0.7-1.5) and
``RandGaussianNoised`` (sd 0.03) on the T1 channel only; with ``mirror`` > 0, a left-right mirror
of the patch with that probability (axis 0 of the RAS+ canonical grid; each left structure's
prior channel and label swapped with its right twin, :func:`basalseg.structures.left_right_permutation`),
which turns every training brain into a second, mirrored anatomy; with ``elastic`` > 0, a MONAI
``Rand3DElasticd`` with that probability on image, prior channels and labels together (smoothing
sigma 6-8 voxels, magnitude 100-200: each structure's volume changes by about 7 % (SD of the log
ratio, measured on 80^3 training patches) with the image and the foundation masks moved alike), so
the student sees local shapes other than the templates' and has to read each boundary from the
image instead of recalling the template's shape. Loss: :class:`DynamicLoss`
(Dice+CE first, boundary loss weighted in by a sigmoid schedule).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from monai.transforms import (Compose, Rand3DElasticd, RandAdjustContrastd, RandAffined, RandGaussianNoised,
                              RandSpatialCropd, SpatialPadd)

from ..networks import STUDENT_ARCH, build_network, save_checkpoint
from ..student import STUDENT_ROI, build_student_input, predict_student
from ..structures import NUM_CLASSES, left_right_permutation
from .foundation_cache import load_cached_case
from .losses import DynamicLoss, reference_distance_maps
from .train_prompter import dice_per_class
from .trainer import TrainConfig, train_loop

__all__ = ["train_student", "student_transforms", "student_architecture", "mirror_left_right"]


def student_architecture(mode: str) -> dict:
    arch = dict(STUDENT_ARCH)
    arch["in_channels"] = 1 if mode == "t1" else STUDENT_ARCH["in_channels"]
    return arch


#: ``Rand3DElasticd`` settings of ``--elastic`` (voxels of the 1 mm working grid; module docstring).
ELASTIC_SIGMA = (6.0, 8.0)
ELASTIC_MAGNITUDE = (100.0, 200.0)


def student_transforms(seed: int, has_prior: bool, patch: tuple[int, int, int] = STUDENT_ROI,
                       elastic: float = 0.0) -> Compose:
    """The training augmentations of the module docstring; ``elastic``: probability of the elastic
    deformation (0: none, the transforms of every student before the one shipped 2026-12-07 late)."""
    if not 0.0 <= elastic <= 1.0:
        raise ValueError(f"elastic must be a probability in [0, 1], got {elastic}")
    keys = ["image", "prior", "label"] if has_prior else ["image", "label"]
    modes = ("bilinear", "bilinear", "nearest") if has_prior else ("bilinear", "nearest")
    spatial = [
        SpatialPadd(keys, spatial_size=patch),
        RandSpatialCropd(keys, roi_size=patch, random_size=False),
        RandAffined(keys, prob=0.5, rotate_range=(0.15, 0.15, 0.15), scale_range=(0.1, 0.1, 0.1), mode=modes,
                    padding_mode="zeros"),
    ]
    if elastic > 0:
        spatial.append(Rand3DElasticd(keys, sigma_range=ELASTIC_SIGMA, magnitude_range=ELASTIC_MAGNITUDE,
                                      prob=elastic, mode=modes, padding_mode="zeros"))
    t = Compose(spatial + [
        RandAdjustContrastd("image", prob=0.4, gamma=(0.7, 1.5)),
        RandGaussianNoised("image", prob=0.3, std=0.03),
    ])
    t.set_random_state(seed)
    return t


def mirror_left_right(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The left-right mirror of one training sample on the RAS+ canonical grid (axis 0 of the
    spatial axes is left-right).

    Args:
        x: ``(C, X, Y, Z)`` student input: the T1, then (``C == 9``) one prior channel per class
            1..8, which are swapped left with right; a T1-only input (``C == 1``) is only mirrored.
        y: ``(X, Y, Z)`` uint8 class labels; each left structure becomes its right twin.
    """
    perm = left_right_permutation()
    x = np.asarray(x)[:, ::-1]
    if x.shape[0] == NUM_CLASSES:
        x = x[[0] + perm[1:]]
    elif x.shape[0] != 1:
        raise ValueError(f"student input must have 1 or {NUM_CLASSES} channels, got {x.shape[0]}")
    return np.ascontiguousarray(x), np.asarray(perm, dtype=np.uint8)[np.asarray(y)[::-1]]


def train_student(train_paths: list, val_paths: list, run_dir: str | Path, config: TrainConfig, mode: str = "sdm",
                  band: float = 10.0, resume: bool = False, device: str = "cpu", a_max: float = 0.5,
                  patch: int = STUDENT_ROI[0], show_progress: bool = True, init: str | Path | None = None,
                  mirror: float = 0.0, elastic: float = 0.0) -> dict:
    """Train a student and save ``<run_dir>/student.pt`` (best validation epoch, else last).

    Args:
        train_paths, val_paths: foundation-cache files.
        mode: ``"sdm"``, ``"mask"`` or ``"t1"``.
        band: SDM band for ``"sdm"``.
        a_max: final boundary-loss weight (see :mod:`basalseg.training.losses`).
        patch: side of the cubic training patches (inference windows stay :data:`STUDENT_ROI`;
            the network is fully convolutional).
        init: a student checkpoint to start from (fine-tuning): its weights, not its optimiser
            state; its input mode must be ``mode``. Ignored when resuming from ``last.pt``.
        mirror: probability of the left-right mirror augmentation.
        elastic: probability of the elastic deformation (:func:`student_transforms`).
    """
    cases = []
    foundation = None
    for path in train_paths:
        c = load_cached_case(path)
        foundation = c.backend.get("backend")
        inputs = build_student_input(c.image01, c.masks, mode, band)
        cases.append((inputs[:1], inputs[1:] if inputs.shape[0] > 1 else None, c.classes))
    val = []
    for path in val_paths:
        c = load_cached_case(path)
        val.append((build_student_input(c.image01, c.masks, mode, band), c.classes))
    has_prior = mode != "t1"
    transforms = student_transforms(config.seed, has_prior, (patch, patch, patch), elastic)
    rng = random.Random(config.seed)

    def batches():
        while True:
            image, prior, label = cases[rng.randrange(len(cases))]
            sample = {"image": image, "label": label[None].astype(np.float32)}
            if has_prior:
                sample["prior"] = prior
            sample = transforms(sample)
            x = np.asarray(sample["image"])
            if has_prior:
                x = np.concatenate([x, np.asarray(sample["prior"])], axis=0)
            y = np.asarray(sample["label"])[0].round().astype(np.uint8)
            if mirror and rng.random() < mirror:
                x, y = mirror_left_right(x, y)
            yield {"x": torch.as_tensor(x)[None].float(), "y": torch.as_tensor(y)[None, None].float(),
                   "phi": torch.as_tensor(reference_distance_maps(y, NUM_CLASSES))[None]}

    loss_fn = DynamicLoss(a_max=a_max)

    def step(net, batch, progress):
        loss_fn.set_progress(progress)
        logits = net(batch["x"].to(device))
        return loss_fn(logits, batch["y"].to(device), batch["phi"].to(device))

    def validate(net):
        dices = [dice_per_class(predict_student(net, x, device), ref).mean() for x, ref in val]
        return {"dice": float(np.mean(dices))}

    arch = student_architecture(mode)
    net = build_network(arch)
    if init is not None:
        from ..errors import BasalSegError
        from ..networks import load_checkpoint

        start, init_meta = load_checkpoint(init, "student")
        if init_meta.get("input_mode", mode) != mode:
            raise BasalSegError(f"--init {init}: a {init_meta.get('input_mode')!r} student, not {mode!r}")
        net.load_state_dict(start.state_dict())
    summary = train_loop(net, batches(), step, run_dir, config, validate if val else None, resume, device,
                         desc=f"student[{mode}{'' if mode != 'sdm' else f' band {band:g}'}]", show_progress=show_progress)
    best = Path(run_dir) / "best.pt"
    state = torch.load(best if best.is_file() else Path(run_dir) / "last.pt", map_location="cpu", weights_only=False)
    net.load_state_dict(state["net"])
    meta = {"trained": True, "foundation": foundation, "input_mode": mode, "band": band,
            "training": {"cases": [Path(p).stem for p in train_paths], "validation": [Path(p).stem for p in val_paths],
                         "config": config.to_dict(), "boundary_a_max": a_max, "patch": patch, "mirror": mirror,
                         **({"elastic": elastic} if elastic else {}),
                         "summary": summary,
                         **({"init": Path(init).name} if init is not None else {})}}
    save_checkpoint(Path(run_dir) / "student.pt", "student", arch, net, meta)
    return summary
