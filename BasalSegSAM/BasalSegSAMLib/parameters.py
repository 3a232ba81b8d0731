"""Run options of a BasalSegSAM job, rendered as ``basalseg`` command-line arguments.

Imports only the standard library, so the options can be built and checked anywhere (widget,
logic, tests, a script in Slicer's Python console).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["RunOptions", "FOUNDATIONS", "DEVICES", "defaultThreads"]

#: Foundation backends the ``basalseg`` command knows (``--foundation``).
FOUNDATIONS = ("litemedsam", "sam2")
#: Device choices shown to the user; ``auto`` means CUDA when available, else CPU.
DEVICES = ("auto", "cpu", "cuda")


def defaultThreads() -> int:
    """CPU threads for a run: all cores but one, so Slicer stays responsive (at least 1)."""
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass
class RunOptions:
    """Options of one run.

    Attributes:
        foundation: ``"litemedsam"`` (works offline) or ``"sam2"``.
        checkpoint: foundation weights file (or, for SAM-2, a catalogue name); empty = the
            backend's default. Only passed for SAM-2: LiteMedSAM ships its weights.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        sdmBand: SDM band half-width in voxels; 0 = the band the student was trained with.
        threads: torch CPU threads in the child process; 0 = :func:`defaultThreads`.
        weightsDir: folder with prompter/student weights and their manifest; empty = shipped weights.
        crop: crop each slice to its region of interest before the foundation encoder.
        qc: also write the QC picture (the module shows results in the views and does not read it).
        mirrorTta: left-right test-time augmentation of the student (the pipeline's default); False
            gives the single pass of results made before 2026-12-04 (``--no-mirror-tta``), e.g. to
            follow a subject whose earlier scans were segmented so.
    """

    foundation: str = "litemedsam"
    checkpoint: str = ""
    device: str = "auto"
    sdmBand: float = 0.0
    threads: int = 0
    weightsDir: str = ""
    crop: bool = True
    qc: bool = False
    mirrorTta: bool = True

    def validate(self) -> "RunOptions":
        """Check every field; raise ``ValueError`` naming the first bad one. Returns ``self``."""
        if self.foundation not in FOUNDATIONS:
            raise ValueError(f"foundation must be one of {', '.join(FOUNDATIONS)}, got {self.foundation!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not (0.0 <= float(self.sdmBand) <= 100.0):
            raise ValueError(f"sdmBand must lie in 0..100 voxels (0 = trained default), got {self.sdmBand}")
        if int(self.threads) < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        checkpoint = (self.checkpoint or "").strip()
        if self.foundation == "sam2" and checkpoint and _looksLikePath(checkpoint) and not os.path.isfile(checkpoint):
            raise ValueError(f"SAM-2 checkpoint file not found: {checkpoint}")
        if self.weightsDir and not os.path.isdir(self.weightsDir):
            raise ValueError(f"weights folder not found: {self.weightsDir}")
        return self

    def commonArgs(self) -> list[str]:
        """Arguments shared by ``basalseg prompts`` and ``basalseg segment``."""
        args = ["--device", self.device, "--threads", str(int(self.threads) or defaultThreads())]
        if self.weightsDir:
            args += ["--weights", self.weightsDir]
        return args

    def segmentArgs(self) -> list[str]:
        """Arguments of ``basalseg segment`` (after the image and ``--out``)."""
        args = self.commonArgs() + ["--foundation", self.foundation]
        checkpoint = (self.checkpoint or "").strip()
        if self.foundation == "sam2" and checkpoint:
            args += ["--checkpoint", checkpoint]
        if float(self.sdmBand) > 0:
            args += ["--band", f"{float(self.sdmBand):g}"]
        if not self.crop:
            args.append("--no-crop")
        if not self.qc:
            args.append("--no-qc")
        if not self.mirrorTta:
            args.append("--no-mirror-tta")
        return args


def _looksLikePath(text: str) -> bool:
    return os.sep in text or "/" in text or text.endswith((".pt", ".pth", ".ckpt", ".safetensors"))
