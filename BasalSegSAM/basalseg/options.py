"""Choices shared by the pipeline and the command line, in one torch-free place.

The command-line parsers (:mod:`basalseg.commands`) offer these values and the modules that
implement them (:mod:`basalseg.foundation.litemedsam_fast`, :mod:`basalseg.prompts`) import them from here,
so there is one list of each and building a parser never imports torch.
"""

from __future__ import annotations

__all__ = ["DEVICES", "ENCODERS", "FOUNDATIONS", "PLANES", "PROGRESS_MODES", "LOCALISE_MODES", "LOCALISE_TRANSFORMS"]

#: LiteMedSAM encoder implementations (:class:`basalseg.foundation.litemedsam_fast.FastLiteMedSAMBackend`).
ENCODERS = ("fused", "onnx", "compile", "torch")

#: foundation planes -> the array axis a slice of that plane is taken along, in the fixed order
#: the planes run in (arrays are canonical RAS, axes ``(x, y, z)``: axial slices are ``[:, :, k]``).
PLANES = {"axial": 2, "coronal": 1, "sagittal": 0}

#: frozen 2D foundation models (:func:`basalseg.foundation.make_backend`).
FOUNDATIONS = ("litemedsam", "sam2")

#: ``--device`` values; ``auto`` (and no value) means CUDA when available, else CPU.
DEVICES = ("cpu", "cuda", "auto")

#: ``--progress`` values (:func:`basalseg.progress.make_reporter`; ``auto``: a bar on a terminal).
PROGRESS_MODES = ("auto", "bar", "json", "none")

#: ``--localise`` values (:mod:`basalseg.localise`).
LOCALISE_MODES = ("auto", "on", "off")

#: ``--localise-transform`` values (:func:`basalseg.localise.localise`; the first is the default).
LOCALISE_TRANSFORMS = ("affine", "rigid")
