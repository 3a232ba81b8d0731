"""Brain localisation under perturbations the head generator does not draw (issue 11).

Each case of a labelled head cohort (``basalseg synth --head``) is localised like a training case
(:func:`basalseg.data.localised.localise_case`, the inference's own ``localise``) as it is and
after each perturbation below; a JSON line per (case, perturbation) gives the label overlap with
the template's DK labels (a correct registration: ~0.6-0.8, :mod:`basalseg.data.localised`), the
correlation ``ncc``, or ``FAIL`` with the error, and the seconds taken.

Perturbations (all keep the labels on the image's grid):

* ``scanner_scale``: intensities x 3000 plus an offset of 200 (a scanner's integer range with a
  non-zero background level), stored as float;
* ``big_fov``: the field of view padded with 60 mm of noisy background on every side;
* ``top_cut``: the top 25 mm of the head (superior, in world coordinates) removed;
* ``dark_gamma`` / ``bright_gamma``: intensity gamma 1.8 / 0.55 (a flat or a washed-out T1);
* ``strong_bias``: a smooth multiplicative field varying 0.4-1.6 over the head;
* ``noisy``: Rician-like noise at 8 % of the 99th percentile;
* ``mp2rage_background``: the background (below 5 % of the 99th percentile, outside the head
  after a closing) replaced by uniform noise over the whole intensity range, as in an MP2RAGE
  UNI image.

    PYTHONPATH=BasalSegSAM OMP_NUM_THREADS=1 .venv/bin/python scripts/localise_stress.py \
        --cohort runs/stress_head [--only big_fov,top_cut] [--limit 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "BasalSegSAM"))

from basalseg.data.cohort import read_cohort  # noqa: E402
from basalseg.data.localised import localise_case  # noqa: E402
from basalseg.imageio import Volume  # noqa: E402


def _world_axis(affine: np.ndarray, world: int) -> int:
    """The voxel axis most aligned with world axis ``world`` (0 R, 1 A, 2 S)."""
    return int(np.argmax(np.abs(affine[world, :3])))


def perturb(name: str, data: np.ndarray, labels: np.ndarray, affine: np.ndarray, rng: np.random.Generator):
    data = data.astype(np.float32)
    hi = float(np.percentile(data, 99)) or 1.0
    if name == "none":
        return data, labels, affine
    if name == "scanner_scale":
        return data / hi * 3000.0 + 200.0, labels, affine
    if name == "big_fov":
        pad_mm = 60.0
        sp = np.sqrt((affine[:3, :3] ** 2).sum(0))
        pads = [int(round(pad_mm / s)) for s in sp]
        out = np.pad(data, [(p, p) for p in pads])
        out += np.abs(rng.normal(0, 0.01 * hi, out.shape)).astype(np.float32)
        lab = np.pad(labels, [(p, p) for p in pads])
        aff = affine.copy()
        aff[:3, 3] -= affine[:3, :3] @ np.array(pads, float)
        return out, lab, aff
    if name == "top_cut":
        ax = _world_axis(affine, 2)
        sp = float(np.sqrt((affine[:3, ax] ** 2).sum()))
        n = int(round(25.0 / sp))
        sl = [slice(None)] * 3
        # the superior end: the end where the world S coordinate is larger
        sl[ax] = slice(None, data.shape[ax] - n) if affine[2, ax] > 0 else slice(n, None)
        sl = tuple(sl)
        aff = affine.copy()
        if affine[2, ax] <= 0:
            aff[:3, 3] += affine[:3, ax] * n
        return data[sl], labels[sl], aff
    if name in ("dark_gamma", "bright_gamma"):
        g = 1.8 if name == "dark_gamma" else 0.55
        return (np.clip(data / hi, 0, None) ** g) * hi, labels, affine
    if name == "strong_bias":
        coords = np.meshgrid(*[np.linspace(-1, 1, s) for s in data.shape], indexing="ij")
        a = rng.normal(size=3)
        a /= np.linalg.norm(a)
        field = 1.0 + 0.6 * (a[0] * coords[0] + a[1] * coords[1] + a[2] * coords[2]) / np.sqrt(3)
        return data * field.astype(np.float32), labels, affine
    if name == "noisy":
        s = 0.08 * hi
        re = data + rng.normal(0, s, data.shape)
        im = rng.normal(0, s, data.shape)
        return np.sqrt(re ** 2 + im ** 2).astype(np.float32), labels, affine
    if name == "mp2rage_background":
        from scipy import ndimage
        head = ndimage.binary_closing(data > 0.05 * hi, iterations=3)
        head = ndimage.binary_fill_holes(head)
        out = data.copy()
        out[~head] = rng.uniform(0, hi, int((~head).sum()))
        return out, labels, affine
    raise ValueError(f"unknown perturbation {name!r}")


PERTURBATIONS = ("none", "scanner_scale", "big_fov", "top_cut", "dark_gamma", "bright_gamma", "strong_bias", "noisy", "mp2rage_background")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cohort", required=True, type=Path)
    p.add_argument("--only", default=",".join(PERTURBATIONS))
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    fails = {n: 0 for n in names}
    overlaps = {n: [] for n in names}
    for case in read_cohort(args.cohort)[: args.limit]:
        vol, labels = case.load()
        for k, name in enumerate(names):
            rng = np.random.default_rng(k)
            data, lab, aff = perturb(name, np.asarray(vol.data), np.asarray(labels), vol.affine, rng)
            t = time.perf_counter()
            row = {"case": case.name, "perturbation": name}
            try:
                _, _, rec = localise_case(Volume(data, aff), lab)
                row.update(overlap=rec["label_overlap"], ncc=rec["ncc"], search=rec.get("search"))
                overlaps[name].append(rec["label_overlap"])
            except Exception as exc:  # noqa: BLE001 - a refused case is the figure
                row.update(overlap="FAIL", error=str(exc)[:120])
                fails[name] += 1
            row["s"] = round(time.perf_counter() - t, 1)
            print(json.dumps(row), flush=True)
    print(json.dumps({n: {"refused": fails[n], "mean_overlap": round(float(np.mean(overlaps[n])), 3) if overlaps[n] else None,
                          "min_overlap": round(float(np.min(overlaps[n])), 3) if overlaps[n] else None} for n in names}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
