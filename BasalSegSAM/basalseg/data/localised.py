"""Training cohorts that look like what inference sees after brain localisation (issue 11).

At inference a whole-head T1 goes through :func:`basalseg.localise.localise`: registration
to the MNI152 1 mm brain (rigid, refined to affine by default since 2026-12-07), resampling into its 182 x 218 x 182 1 mm RAS grid (trilinear) and a
skull strip with the template's brain mask dilated by ``strip_margin_mm``. The networks then see
only such images. :func:`localise_case` puts a labelled case through **that same function**
(``mode="on"``) and carries its labels through the same transform (nearest neighbour: template
voxel -> template world -> input world -> input voxel), so image and labels stay aligned and
the result is exactly what the pipeline would feed the networks for that scan.
:func:`localise_cohort` does it for every case of a cohort (e.g. ``basalseg synth --head``) and
writes a normal cohort (nnU-Net layout and ``dataset.json``, :mod:`basalseg.data.cohort`) that
``basalseg train --cohort`` reads unchanged.

**Registration QC, per case** (in ``dataset.json`` under ``basalseg_localised.cases`` and in
``OUT/localisation/<case>.json``): the localisation's ``ncc`` with the template and
``label_overlap``, the mean Dice over the 8 structures between the localised labels and the
template's own Desikan-Killiany labels (a correct registration of a synthetic subject puts its
structures near the template's: ~0.6-0.8; a failed one far from them).

**Failed registrations are dropped** (``status: "dropped"`` with the reason, no files written):
a case the localisation refuses (``NoBrainFoundError``/``NotT1Error``: inference would give no
output for it either) and a case whose ``label_overlap`` is below ``min_overlap`` (default 0.3:
the brain ended up away from the template's, so the skull strip would cut it). Dropped cases
are not counted in ``numTraining``.

Coordinates: all matrices are RAS world (mm) as in :mod:`basalseg.spatial`; the output grid is
the template's canonical grid (``basalseg.localise._template``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import BasalSegError
from ..imageio import Volume
from ..structures import STRUCTURES

__all__ = ["localise_case", "localise_cohort", "label_overlap", "MIN_OVERLAP"]

#: cases whose localised labels overlap the template's DK labels less than this (mean Dice over
#: the 8 structures) count as failed registrations and are dropped
MIN_OVERLAP = 0.3


def label_overlap(labels: np.ndarray, reference: np.ndarray) -> float:
    """Mean Dice over the 8 structures (FreeSurfer values) of two labelmaps on the same grid."""
    dices = []
    for s in STRUCTURES:
        a, b = labels == s.label, reference == s.label
        denom = int(a.sum()) + int(b.sum())
        dices.append(2.0 * int((a & b).sum()) / denom if denom else 1.0)
    return float(np.mean(dices))


def localise_case(volume: Volume, labels: np.ndarray, strip_margin_mm: float = 3.0,
                  threads: int = 1, transform: str = "affine") -> tuple[Volume, np.ndarray, dict]:
    """The localised image (as inference makes it), its labels on the same grid, and the QC record.

    Args:
        volume: the input image (any grid, pose, axis code).
        labels: FreeSurfer-valued labels on ``volume``'s grid.
        transform: the localisation's transform (:data:`basalseg.options.LOCALISE_TRANSFORMS`;
            inference's default ``affine``; cohorts localised before 2026-12-07 were ``rigid``).

    Returns:
        ``(image on the template grid, skull-stripped; int16 labels on that grid; record)`` with
        the record's ``ncc``, ``label_overlap``, ``rotation_deg``, ``template_to_input``, ``search``, ``seconds``.

    Raises:
        NoBrainFoundError, NotT1Error: the localisation refused the image (as at inference).
    """
    from ..localise import _template, localise

    labels = np.asarray(labels).reshape(volume.shape)
    image, loc = localise(volume, "on", strip_margin_mm=strip_margin_mm, threads=threads, transform=transform)
    grid = loc.grid
    # same mapping as localise(): template voxel -> template world -> input world -> input voxel
    vox = np.linalg.inv(volume.affine) @ loc.template_to_input @ grid.affine
    out_labels = ndimage.affine_transform(labels.astype(np.int16), vox[:3, :3], vox[:3, 3], output_shape=grid.shape,
                                          order=0, mode="constant", cval=0, prefilter=False).astype(np.int16)
    template_labels = _template()[2]
    record = {"ncc": None if loc.ncc is None else round(float(loc.ncc), 4),
              "label_overlap": round(label_overlap(out_labels, template_labels), 4),
              "rotation_deg": loc.rotation_deg, "template_to_input": np.round(loc.template_to_input, 5).tolist(),
              "head_tissue_fraction": loc.contrast.get("head_tissue_fraction"), "search": loc.search,
              "transform": loc.transform, "scale": loc.scale,
              "seconds": round(loc.seconds, 2)}
    return image, out_labels, record


def _method(strip_margin_mm: float, min_overlap: float, transform: str) -> dict:
    return {"function": "basalseg.localise.localise(mode='on')", "strip_margin_mm": strip_margin_mm, "transform": transform,
            "labels": "nearest neighbour through the same transform", "min_overlap": min_overlap,
            "failed": "dropped (localisation error, or label_overlap < min_overlap)"}


def _done_records(root: Path, cases, transform: str) -> dict:
    """The per-case records already in ``root/localisation`` (a resumed run), by case name.

    Raises:
        ValueError: a record was made with another transform (records before 2026-12-07 name
            none: rigid), so resuming would mix two transforms in one cohort.
    """
    done = {}
    for case in cases:
        rec_path = root / "localisation" / f"{case.name}.json"
        if rec_path.is_file():
            record = json.loads(rec_path.read_text(encoding="utf-8"))
            if record.get("localise_transform", "rigid") != transform:
                raise ValueError(f"{root}: {case.name} was localised with the {record.get('localise_transform', 'rigid')} "
                                 f"transform, not {transform}; choose another folder (one cohort, one transform)")
            done[case.name] = record
    return done


def localise_cohort(source: str | os.PathLike, out_dir: str | os.PathLike, *, strip_margin_mm: float = 3.0,
                    min_overlap: float = MIN_OVERLAP, threads: int = 1, progress=None, transform: str = "affine") -> list:
    """Localise every case of the cohort ``source`` into a new cohort ``out_dir`` (module docstring).

    Resumable: a case with a record in ``out_dir/localisation/`` is not redone. Images are stored
    as int16 when the source image is integer-valued (``basalseg synth``'s int16 files; rounded
    after the trilinear resampling), else float32. ``dataset.json`` keeps the source's
    ``basalseg_synth`` block (so a weights manifest can describe the cohort) and adds
    ``basalseg_localised`` (method, source, per-case QC).

    Returns:
        The kept cases as :class:`basalseg.data.cohort.CohortCase`.

    Raises:
        ValueError: ``out_dir`` is ``source`` or already holds a ``dataset.json`` of another source
            or transform.
    """
    from ..localise import NoBrainFoundError, NotT1Error
    from .cohort import CohortCase, case_paths, read_cohort, write_json_atomic, write_nifti_atomic

    source, root = Path(source), Path(out_dir)
    if source.resolve() == root.resolve():
        raise ValueError("out_dir must differ from the source cohort")
    if (root / "dataset.json").is_file():
        old = json.loads((root / "dataset.json").read_text(encoding="utf-8")).get("basalseg_localised", {})
        if Path(old.get("source", "")).resolve() != source.resolve():
            raise ValueError(f"{root} already holds a dataset.json (not localised from {source}); choose another folder")
        if old.get("transform", "rigid") != transform:  # cohorts before 2026-12-07 record none: rigid
            raise ValueError(f"{root} was localised with the {old.get('transform', 'rigid')} transform, not {transform}; "
                             "choose another folder (one cohort, one transform)")
    cases = read_cohort(source)
    (root / "localisation").mkdir(parents=True, exist_ok=True)
    done = _done_records(root, cases, transform)  # checked before any case is written
    records, kept = [], []
    for n, case in enumerate(cases):
        rec_path = root / "localisation" / f"{case.name}.json"
        image_path, label_path = case_paths(root, case.name)
        if case.name in done:
            record = done[case.name]
        else:
            volume, labels = case.load()
            t0 = time.perf_counter()
            try:
                image, out_labels, record = localise_case(volume, labels, strip_margin_mm, threads, transform)
            except (NoBrainFoundError, NotT1Error) as exc:
                record = {"status": "dropped", "reason": f"localisation refused it: {exc}"}
            else:
                if record["label_overlap"] < min_overlap:
                    record.update(status="dropped", reason=f"label_overlap {record['label_overlap']:.3f} < {min_overlap}")
                else:
                    data = np.asarray(image.data, np.float32)
                    src = np.asarray(volume.data)
                    integer = bool(np.all(src == np.round(src)))
                    if integer:
                        data = np.round(np.clip(data, 0, 32767))
                    write_nifti_atomic(image_path, data, image.affine, dtype=np.dtype("int16" if integer else "float32"))
                    write_nifti_atomic(label_path, out_labels, image.affine, dtype=np.int16)
                    record["status"] = "kept"
            record = {"name": case.name, **record, "localise_transform": transform,
                      "total_seconds": round(time.perf_counter() - t0, 2)}
            write_json_atomic(rec_path, record)
        records.append(record)
        if record["status"] == "kept":
            kept.append(CohortCase(case.name, image_path, label_path))
        if progress is not None:
            progress(n + 1, len(cases))
    try:
        meta = json.loads((source / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {"channel_names": {"0": "T1"}, "labels": {"background": 0, **{s.name: s.label for s in STRUCTURES}}}
    meta.update({"name": root.name, "numTraining": len(kept), "file_ending": ".nii.gz",
                 "description": f"{meta.get('description', 'cohort')}; localised as at inference (basalseg.data.localised)",
                 "basalseg_localised": {"source": str(source), **_method(strip_margin_mm, min_overlap, transform),
                                        "n_dropped": len(records) - len(kept), "cases": records}})
    write_json_atomic(root / "dataset.json", meta)
    if not kept:
        raise BasalSegError(f"every case of {source} failed its localisation; see {root / 'localisation'}")
    return kept
