"""Train the prompt generator on prepared cases at 2 mm.

Each step takes one case (batch of 1; InstanceNorm), pads it to at least 96^3 at 2 mm and cuts
a random 96^3 window (192 mm: nearly the whole brain, so the window position acts as a
translation), then applies MONAI augmentations: ``RandAffined`` (rotation up to 0.2 rad, scaling
+-15%), ``RandAdjustContrastd`` (gamma 0.6-1.6), ``RandGaussianNoised`` (sd 0.03) and
``RandBiasFieldd``. Loss: MONAI ``DiceCELoss`` over the 8 structures.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandBiasFieldd, RandGaussianNoised,
                              RandSpatialCropd, SpatialPadd)

from ..metrics import dice_per_class as _dice_per_class
from ..networks import PROMPTER_ARCH, build_network, save_checkpoint
from ..prompter import PROMPTER_ROI, downsample2, predict_coarse
from ..structures import NUM_CLASSES
from .prepare import load_prepared
from .trainer import TrainConfig, train_loop

__all__ = ["train_prompter", "prompter_transforms", "dice_per_class"]


def prompter_transforms(seed: int) -> Compose:
    keys = ["image", "label"]
    t = Compose([
        SpatialPadd(keys, spatial_size=PROMPTER_ROI),
        RandSpatialCropd(keys, roi_size=PROMPTER_ROI, random_size=False),
        RandAffined(keys, prob=0.7, rotate_range=(0.2, 0.2, 0.2), scale_range=(0.15, 0.15, 0.15),
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandAdjustContrastd("image", prob=0.5, gamma=(0.6, 1.6)),
        RandBiasFieldd("image", prob=0.3, coeff_range=(0.0, 0.2)),
        RandGaussianNoised("image", prob=0.3, std=0.03),
    ])
    t.set_random_state(seed)
    return t


def dice_per_class(pred: np.ndarray, ref: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Dice for classes 1..C-1 (1.0 where both are empty; :func:`basalseg.metrics.dice_per_class`)."""
    return _dice_per_class(pred, ref, num_classes)


def _low_res(case):
    return downsample2(case.image01), np.ascontiguousarray(case.classes[::2, ::2, ::2])


def train_prompter(train_paths: list, val_paths: list, run_dir: str | Path, config: TrainConfig,
                   resume: bool = False, device: str = "cpu", show_progress: bool = True,
                   init: str | Path | None = None) -> dict:
    """Train and save ``<run_dir>/prompter.pt`` (best validation epoch, else last); return the summary.

    ``init``: a prompter checkpoint to start from (fine-tuning): its weights, not its optimiser
    state; ignored when resuming from ``last.pt``.
    """
    data = [_low_res(load_prepared(p)) for p in train_paths]
    val = [load_prepared(p) for p in val_paths]
    transforms = prompter_transforms(config.seed)
    rng = random.Random(config.seed)

    def batches():
        while True:
            image, label = data[rng.randrange(len(data))]
            sample = transforms({"image": image[None], "label": label[None].astype(np.float32)})
            yield {"image": torch.as_tensor(np.asarray(sample["image"]))[None].float(),
                   "label": torch.as_tensor(np.asarray(sample["label"]))[None].float()}

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)

    def step(net, batch, progress):
        logits = net(batch["image"].to(device))
        return loss_fn(logits, batch["label"].to(device)), {}

    def validate(net):
        if not val:
            return {}
        dices = [dice_per_class(predict_coarse(net, c.image01, device), c.classes).mean() for c in val]
        return {"dice": float(np.mean(dices))}

    net = build_network(PROMPTER_ARCH)
    if init is not None:
        from ..networks import load_checkpoint

        start, _ = load_checkpoint(init, "prompter")
        net.load_state_dict(start.state_dict())
    summary = train_loop(net, batches(), step, run_dir, config, validate if val else None, resume, device,
                         desc="prompter", show_progress=show_progress)
    best = Path(run_dir) / "best.pt"
    state = torch.load(best if best.is_file() else Path(run_dir) / "last.pt", map_location="cpu", weights_only=False)
    net.load_state_dict(state["net"])
    meta = {"trained": True, "training": {"cases": [Path(p).stem for p in train_paths],
                                          "validation": [Path(p).stem for p in val_paths],
                                          "config": config.to_dict(), "summary": summary,
                                          **({"init": Path(init).name} if init is not None else {})}}
    save_checkpoint(Path(run_dir) / "prompter.pt", "prompter", PROMPTER_ARCH, net, meta)
    return summary
