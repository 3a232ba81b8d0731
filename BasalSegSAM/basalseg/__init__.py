"""BasalSegSAM pipeline: basal ganglia and thalamus segmentation and volumetry from T1 MRI.

A small 3D U-Net proposes per-slice prompts, a frozen 2D foundation model (SAM-2 or LiteMedSAM)
turns them into masks, the masks become a signed-distance channel, and a student 3D U-Net reads
[T1, SDM] to give the final labelmap. This package never imports Slicer, Qt or VTK.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
