"""Stands in for ``basalseg prompts`` and the Slicer segment worker in the Slicer-side tests
(``test_slicer_logic.py``, ``test_slicer_widget.py``): same files, same JSON lines, written with
the pipeline's own writers; everything but the networks runs for real.

Run as ``python fake_basalseg.py prompts|segment IMAGE --out OUT [--prompts P] [...]``.
Environment:

``FAKE_MODE``
    ``ok`` (default), ``error`` (NothingFoundError, exit 2), ``hang`` (sleeps after 30 %),
    ``shifted`` (the labelmap's affine moved 5 mm: off the input grid).
``FAKE_STRUCTURES``
    ``one`` (default): bright voxels are the left putamen; ``two``: bright voxels are the left
    putamen on one half of the image and the right caudate on the other.
``FAKE_RECORD``
    a file to which each call's argv and prompts are appended (JSON lines).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from basalseg.imageio import load_volume
from basalseg.outputs import nifti_bytes, volume_rows, volumes_csv_text
from basalseg.prompts import load_prompts, prompts_from_classes
from basalseg.spatial import to_canonical


def emit(**fields):
    print(json.dumps(fields), flush=True)


def _split(shape) -> np.ndarray:
    """True on the first half of the first array axis."""
    return np.arange(shape[0])[:, None, None] < shape[0] // 2


def main() -> None:
    kind = sys.argv[1]
    parser = argparse.ArgumentParser()
    parser.add_argument("image")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts")
    args, _ = parser.parse_known_args(sys.argv[2:])
    record = os.environ.get("FAKE_RECORD")
    if record:
        with open(record, "a") as handle:
            handle.write(json.dumps({"argv": sys.argv[1:],
                                     "prompts": Path(args.prompts).read_text() if args.prompts else None}) + "\n")
    mode = os.environ.get("FAKE_MODE", "ok")
    two = os.environ.get("FAKE_STRUCTURES", "one") == "two"
    volume = load_volume(args.image)
    emit(event="progress", stage="prepare", fraction=1.0, overall=0.04)
    if mode == "hang":
        emit(event="progress", stage="foundation", fraction=0.3, overall=0.3)
        time.sleep(120)
    if mode == "error":
        print("basalseg: error: the prompt generator found none of the 8 structures", file=sys.stderr)
        emit(event="error", message="the prompt generator found none of the 8 structures in this image",
             kind="NothingFoundError")
        sys.exit(2)
    canonical, grid = to_canonical(volume)
    bright = canonical > 550
    # classes: 3 = left putamen, 6 = right caudate; labels: 12, 50 (FreeSurfer)
    classes = (np.where(bright, np.where(_split(canonical.shape), 3, 6), 0) if two else np.where(bright, 3, 0))
    prompts = load_prompts(args.prompts) if args.prompts else prompts_from_classes(classes.astype(np.uint8), grid)
    out = Path(args.out)
    out.mkdir(parents=True)
    (out / "prompts.json").write_text(json.dumps(prompts.to_dict()))
    if kind == "segment":
        high = volume.data > 550
        labels = (np.where(high, np.where(_split(volume.shape), 12, 50), 0) if two else np.where(high, 12, 0))
        labels = labels.astype(np.int16)
        affine = volume.affine.copy()
        if mode == "shifted":
            affine[:3, 3] += 5.0
        emit(event="progress", stage="student", fraction=1.0, overall=0.96)
        (out / "segmentation.nii.gz").write_bytes(nifti_bytes(labels, affine))
        (out / "volumes.csv").write_text(volumes_csv_text(volume_rows(labels, volume.voxel_volume_mm3)))
        emit(event="cache", slices=len(prompts.slices()), reused=0, computed=len(prompts.slices()))
    (out / "provenance.json").write_text(json.dumps({"fake": True}))
    emit(event="done", out=str(out))


if __name__ == "__main__":
    main()
