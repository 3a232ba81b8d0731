"""Whole head vs the same brain skull-stripped (README "Whole-head inputs", issue 11).

Usage: ``python scripts/head_vs_stripped.py [SEED] [MAX_DEG]`` (defaults 424242 and 15, the
subject of ``test_whole_head_and_skull_stripped_brain_agree``). Synthesises one head-like
subject (1.4-1.5 mm voxels, posed up to MAX_DEG about each axis, off-origin), strips it with its
own brain mask, and segments the head (``--localise auto``), the stripped brain in its pose
(``off``) and the stripped brain with ``auto``; prints each one's mean and per-structure Dice
against the subject's labels and the three pairwise agreements. Shipped weights, one thread.
"""

import sys
import time

import numpy as np

from basalseg import metrics
from basalseg.data import atlas
from basalseg.data.head import HeadConfig, brain_config_for_heads, synthesize_head
from basalseg.data.synth import SynthConfig, prepare_source
from basalseg.imageio import Volume
from basalseg.pipeline import Pipeline, PipelineConfig
from basalseg.structures import STRUCTURES


def dice(x, y):
    """Mean and per-structure Dice of two FreeSurfer labelmaps (basalseg.metrics.dice)."""
    out = [metrics.dice(x == s.label, y == s.label) for s in STRUCTURES]
    return round(float(np.mean(out)), 4), [round(float(d), 3) for d in out]


def main(seed: int, max_deg: float) -> None:
    cfg = SynthConfig()
    src = prepare_source(atlas.load_template("mni152"), atlas.load_reference_labels("mni152", "dk", full=True),
                         brain_config_for_heads(cfg), name="mni152")
    subject = synthesize_head(src, seed, cfg, HeadConfig(spacing_mm=(1.4, 1.5), thick_slice_prob=0.0, rotation_deg=max_deg))
    head = subject.image
    stripped = Volume(np.where(subject.brain_mask, head.data, 0.0).astype(np.float32), head.affine)
    ref = np.asarray(subject.labels)
    res = {}
    for name, vol, mode in (("head_auto", head, "auto"), ("stripped_off", stripped, "off"), ("stripped_auto", stripped, "auto")):
        t = time.time()
        r = Pipeline(PipelineConfig(threads=1, localise=mode)).segment(vol)
        loc = r.provenance.get("localisation") or {"applied": False}  # "off" records none
        res[name] = r.labels
        print(name, "applied", loc["applied"], "rotation", loc.get("rotation_deg"), "seconds", round(time.time() - t, 1),
              "Dice vs labels", dice(r.labels, ref), flush=True)
    for a, b in (("head_auto", "stripped_off"), ("head_auto", "stripped_auto"), ("stripped_off", "stripped_auto")):
        print(a, "vs", b, dice(res[a], res[b]), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 424242, float(sys.argv[2]) if len(sys.argv) > 2 else 15.0)
