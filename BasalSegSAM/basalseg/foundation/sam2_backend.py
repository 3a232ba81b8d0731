"""SAM-2 (2.1) backend: Meta's image predictor behind the :class:`FoundationBackend` interface.

The model is built by the ``sam2`` package (``pip install sam2``) from one of its Hydra configs
and loaded from an official checkpoint, given either as a file or as a catalogue name
(:mod:`basalseg.catalogue`) that is fetched into the user cache by
:func:`basalseg.download.fetch_cached` (offline: it must already be there).

Preprocessing is SAM-2's own (``SAM2ImagePredictor``): the ``(H, W)`` slice in [0, 1] becomes an
8-bit RGB image (the grey value repeated; an ``(H, W, 3)`` image, the 3-slice context, becomes
8-bit RGB channel by channel), which SAM-2 stretches to ``image_size`` x
``image_size`` (1024; no aspect-preserving padding, unlike SAM-1 and LiteMedSAM), normalises
with ImageNet statistics and encodes once. Boxes ``(N, 4)`` XYXY and points ``(x, y)`` are in
pixels of the given slice; SAM-2 rescales them itself. All ``N`` prompts of a slice go through
the mask decoder in one batched call; the low-resolution logits are upsampled back to
``(H, W)`` and thresholded.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import BackendUnavailableError, CheckpointError
from .base import check_prompt_arrays, pick_device
from ..download import sha256_file as _sha256

__all__ = ["SAM2Backend", "infer_config"]

#: SAM-2.0 checkpoint names (not in the 2.1 catalogue) -> the package's config for them.
_SAM2_0_SUFFIX = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
_SAM2_0_NAME = re.compile(r"^sam2_hiera_(tiny|small|base_plus|large)\.pt$")

_NO_CHECKPOINT = (
    "SAM-2 needs a checkpoint: pass --checkpoint PATH or a catalogue name ({names}); "
    "offline use needs the file already downloaded"
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def infer_config(checkpoint: str | os.PathLike) -> str | None:
    """The ``sam2`` config name matching an official checkpoint file name, else ``None``.

    ``sam2.1_hiera_tiny.pt`` -> ``configs/sam2.1/sam2.1_hiera_t.yaml`` (from the catalogue);
    the SAM-2.0 names ``sam2_hiera_<size>.pt`` map to ``configs/sam2/sam2_hiera_<t|s|b+|l>.yaml``.
    """
    from ..catalogue import entry_for_filename

    name = Path(checkpoint).name
    entry = entry_for_filename(name)
    if entry is not None:
        return entry.config
    match = _SAM2_0_NAME.match(name)
    if match:
        return f"configs/sam2/sam2_hiera_{_SAM2_0_SUFFIX[match.group(1)]}.yaml"
    return None


class SAM2Backend:
    """SAM-2.1 image predictor (Hiera encoder + SAM-2 prompt encoder / mask decoder).

    Args:
        checkpoint: a SAM-2 ``.pt`` file (a dict with a ``"model"`` state dict, as Meta
            publishes them), or a catalogue name (``"sam2.1_hiera_tiny"``, ``_small``,
            ``_base_plus``, ``_large``) looked up in the user cache and downloaded when online.
            ``None`` is only allowed with ``random_init=True``.
        device: ``"cpu"``, ``"cuda"`` or ``None`` for CUDA when available. On CUDA the
            encoder and decoder run under bfloat16 autocast.
        config: the ``sam2`` package config name (``"configs/sam2.1/sam2.1_hiera_t.yaml"``).
            ``None``: taken from the catalogue entry, or inferred from an official checkpoint
            file name, or (with ``random_init``) the tiny config.
        use_points: pass the prompts' points to the decoder together with the box.
        random_init: build the model from ``config`` with random weights and load nothing.
            For tests only; recorded in :meth:`describe`. Needs ``checkpoint=None``.
        threshold: logit threshold for the mask (0 = probability 0.5).

    Raises:
        ValueError: a malformed argument (message names it), an unknown ``config``, or a
            checkpoint whose config cannot be inferred when ``config`` is not given.
        BackendUnavailableError: the ``sam2`` package is missing, no checkpoint was given, or
            a catalogue checkpoint is not cached while offline.
        CheckpointError: the checkpoint is missing, corrupt, not a SAM-2 state dict, or of a
            different architecture than ``config``; or an unknown catalogue name.
        DownloadError: fetching a catalogue checkpoint failed.
    """

    name = "sam2"
    native_size = 1024

    def __init__(self, checkpoint: str | os.PathLike | None = None, device: str | None = None,
                 config: str | None = None, use_points: bool = True, random_init: bool = False,
                 threshold: float = 0.0):
        if not isinstance(use_points, (bool, np.bool_)):
            raise ValueError(f"use_points must be True or False, got {use_points!r}")
        if not isinstance(random_init, (bool, np.bool_)):
            raise ValueError(f"random_init must be True or False, got {random_init!r}")
        try:
            threshold = float(threshold)
        except (TypeError, ValueError):
            raise ValueError(f"threshold must be a number (a mask logit), got {threshold!r}") from None
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
        if config is not None and (not isinstance(config, str) or not config.strip()):
            raise ValueError(f"config must be a sam2 config name such as 'configs/sam2.1/sam2.1_hiera_t.yaml', got {config!r}")
        if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
            raise ValueError(f"checkpoint must be a file path or a catalogue name, got {checkpoint!r}")
        if random_init and checkpoint is not None:
            raise ValueError("random_init=True builds an untrained model: pass checkpoint=None with it")

        from ..catalogue import CATALOGUE

        if checkpoint is None and not random_init:
            raise BackendUnavailableError(_NO_CHECKPOINT.format(names=", ".join(CATALOGUE)))
        try:
            import sam2  # noqa: F401  (initialises Hydra's config module on import)
            from sam2.build_sam import build_sam2
            from sam2.sam2_image_predictor import SAM2ImagePredictor
        except ImportError as exc:
            raise BackendUnavailableError(f"SAM-2 needs the package sam2 (pip install 'basalseg[sam2]'): {exc}") from exc

        self.device = pick_device(device)
        self.use_points = bool(use_points)
        self.threshold = threshold
        self.random_init = bool(random_init)
        self.model_name: str | None = None
        self.checkpoint: str | None = None
        self.checkpoint_sha256: str | None = None

        state: dict | None = None
        if checkpoint is not None:
            path, entry = self._resolve_checkpoint(checkpoint)
            if entry is not None:
                self.model_name = entry.name
                if config is None:
                    config = entry.config
            if config is None:
                config = infer_config(path)
                if config is None:
                    raise ValueError(
                        f"config is required: cannot tell the SAM-2 model size from the file name {path.name!r}; "
                        f"pass config='configs/sam2.1/sam2.1_hiera_t.yaml' (or _s, _b+, _l)"
                    )
            self.checkpoint = str(path)
        elif config is None:
            config = CATALOGUE["sam2.1_hiera_tiny"].config
        self.config = self._check_config(config.strip(), Path(sam2.__file__).parent)
        if self.checkpoint is not None:
            self.checkpoint_sha256 = _sha256(self.checkpoint)
            state = self._load_state(Path(self.checkpoint))

        try:
            model = build_sam2(self.config, None, device="cpu", mode="eval")
        except Exception as exc:  # Hydra / instantiation errors: a config the package cannot build
            raise ValueError(f"config {self.config!r}: sam2 cannot build it ({type(exc).__name__}: {_first_line(exc)})") from exc
        if state is not None:
            self._load_weights(model, state)
            del state
        model = model.to(self.device).eval()
        for param in model.parameters():
            param.requires_grad_(False)
        self.model = model
        self.native_size = int(model.image_size)
        with warnings.catch_warnings():
            # SAM2Transforms uses torch.jit.script, which recent torch marks as deprecated.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
            self.predictor = SAM2ImagePredictor(model, mask_threshold=self.threshold)
        if self.native_size != 1024 and hasattr(self.predictor, "_bb_feat_sizes"):
            # The predictor hard-codes the feature-map sizes of a 1024 px input.
            s = self.native_size
            self.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
        self._image_hw: tuple[int, int] | None = None

    # ------------------------------------------------------------------------ construction

    @staticmethod
    def _resolve_checkpoint(checkpoint: str | os.PathLike):
        """``(path, catalogue entry or None)`` for a file path or a catalogue name."""
        from ..catalogue import CATALOGUE, UnknownModelError, get_entry
        from ..download import fetch_cached

        text = os.fspath(checkpoint)
        path = Path(text).expanduser()
        if path.is_file():
            return path, None
        if path.is_dir():
            raise CheckpointError(f"SAM-2 checkpoint {path} is a folder, not a .pt file")
        looks_like_path = isinstance(checkpoint, os.PathLike) or "/" in text or "\\" in text or os.sep in text
        if not looks_like_path:
            try:
                entry = get_entry(text)
            except UnknownModelError:
                raise UnknownModelError(
                    f"SAM-2 checkpoint {text!r} is neither a file nor a catalogue name; "
                    f"catalogue names: {', '.join(CATALOGUE)}"
                ) from None
            return fetch_cached(entry), entry
        raise CheckpointError(f"SAM-2 checkpoint not found: {path}")

    @staticmethod
    def _check_config(config: str, package_dir: Path) -> str:
        if (package_dir / config).is_file():
            return config
        known = sorted(p.relative_to(package_dir).as_posix() for p in (package_dir / "configs").rglob("*.yaml"))
        raise ValueError(
            f"config {config!r} is not a config of the installed sam2 package; choose one of {', '.join(known)}"
        )

    @staticmethod
    def _load_state(path: Path) -> dict:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            if not zipfile.is_zipfile(path):
                raise CheckpointError(
                    f"{path}: not a PyTorch checkpoint (not a zip archive; truncated or corrupt download?)"
                ) from exc
            raise CheckpointError(f"{path}: not a readable SAM-2 checkpoint ({type(exc).__name__}: {_first_line(exc)})") from exc
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            obj = obj["model"]
        if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: not a SAM-2 checkpoint (expected a dict with a 'model' state dict of tensors)")
        return obj

    def _load_weights(self, model: torch.nn.Module, state: dict) -> None:
        where = f"{self.checkpoint}"
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches are raised even with strict=False
            detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), _first_line(exc))
            detail = detail.rstrip(". ")
            raise CheckpointError(
                f"{where}: weights do not fit config {self.config} ({detail}); is it the right model size?"
            ) from exc
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:2])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:2])})")
            raise CheckpointError(f"{where}: not a SAM-2 checkpoint for config {self.config}: {'; '.join(parts)}")

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.model_name, "checkpoint": self.checkpoint,
                "checkpoint_sha256": self.checkpoint_sha256, "config": self.config,
                "random_init": self.random_init, "native_size": self.native_size,
                "use_points": self.use_points, "threshold": self.threshold, "device": str(self.device)}

    # --------------------------------------------------------------------------- inference

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def set_image(self, image: np.ndarray) -> None:
        """Encode one slice.

        Args:
            image: ``(H, W)`` float array with values in [0, 1] (clipped; NaN read as 0), or
                ``(H, W, 3)`` (the 3-slice context: each channel becomes one 8-bit RGB channel);
                rows are ``y``, columns ``x``.
        """
        image = np.asarray(image, dtype=np.float32)
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)) or image.size == 0:
            raise ValueError(f"set_image needs a non-empty 2D (H, W) slice or an (H, W, 3) image, got shape {image.shape}")
        grey = np.rint(np.clip(np.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
        rgb = np.ascontiguousarray(grey if grey.ndim == 3 else np.repeat(grey[:, :, None], 3, axis=2))
        self._image_hw = None
        with torch.inference_mode(), self._autocast():
            self.predictor.set_image(rgb)
        self._image_hw = (int(image.shape[0]), int(image.shape[1]))

    def predict(self, boxes: np.ndarray, points: np.ndarray | None = None,
                point_labels: np.ndarray | None = None) -> np.ndarray:
        """Masks for ``N`` prompts on the set slice, decoded in one batched call.

        Args:
            boxes: ``(N, 4)`` XYXY in pixels of the slice (corners inclusive).
            points: ``(N, P, 2)`` as ``(x, y)`` pixels, or ``None``; ignored unless
                ``use_points``.
            point_labels: ``(N, P)``: 1 positive, 0 negative, -1 padding (a prompt with fewer
                points than ``P`` fills the rest with -1; their coordinates are ignored).
                ``None`` with points means all positive.

        Returns:
            ``(N, H, W)`` bool masks on the slice's pixel grid.

        Raises:
            RuntimeError: :meth:`set_image` was not called first.
            ValueError: malformed or non-finite prompts, or labels other than -1/0/1.
        """
        if self._image_hw is None or not getattr(self.predictor, "_is_image_set", False):
            raise RuntimeError("call set_image() before predict()")
        boxes, points, point_labels = check_prompt_arrays(boxes, points, point_labels)
        h, w = self._image_hw
        n = boxes.shape[0]
        if n == 0:
            return np.zeros((0, h, w), dtype=bool)
        if not np.isfinite(boxes).all():
            raise ValueError("boxes must be finite XYXY pixel coordinates")
        coords = labels = None
        if self.use_points and points is not None:
            if not np.isin(point_labels, (-1, 0, 1)).all():
                raise ValueError(f"point_labels must be 1, 0 or -1 (padding), got {sorted(set(point_labels.ravel().tolist()))}")
            keep = (point_labels != -1).any(axis=0)  # drop columns that are padding in every prompt
            if keep.any():
                coords = points[:, keep].copy()
                labels = point_labels[:, keep]
                pad = labels == -1
                coords[pad] = 0.0
                if not np.isfinite(coords).all():
                    raise ValueError("points must be finite (x, y) pixel coordinates")
        with torch.inference_mode(), self._autocast():
            logits, _, _ = self.predictor.predict(point_coords=coords, point_labels=labels, box=boxes,
                                                  multimask_output=False, return_logits=True)
        # SAM2ImagePredictor squeezes the batch axis only when N == 1: (N, 1, H, W) or (1, H, W).
        logits = np.asarray(logits).reshape(n, h, w)
        return logits > self.threshold
