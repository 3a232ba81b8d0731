"""The training stages, one after the other: what ``basalseg train`` runs (:func:`train`).

``basalseg train --cohort COHORT [--cohort ...] --work WORK [--stage all|prepare|prompter|cache|student]``
    1. prepare: every case to canonical space (``WORK/cases``);
    2. prompter: train the prompt generator (``WORK/prompter/prompter.pt``);
    3. cache: run the frozen foundation model once per case from the prompter's jittered prompts
       (``WORK/foundation/<backend>/``);
    4. student: train the student (``WORK/student-<mode>[-band<b>]-<backend>/student.pt``).
    ``--export DIR`` copies the trained networks into a weights folder with its manifest, which
    ``--weights DIR`` (or ``$BASALSEG_WEIGHTS``) then uses. Every stage skips work already done;
    ``--resume`` continues an interrupted network training from its last epoch.

Validation cases (``--val N``, default 4) are taken out of the training cases by a seeded
shuffle and used only to pick the best epoch.

The command line is :mod:`basalseg.commands.training` (also ``basalseg synth``, a synthetic cohort
from :func:`basalseg.data.generate.generate_cohort`).
"""

from __future__ import annotations

import datetime
import json
import random
import shutil
from pathlib import Path

__all__ = ["train", "export_weights", "describe_cohort", "STAGES"]

#: the stages of :func:`train`, in order.
STAGES = ("prepare", "prompter", "cache", "student")


def _split(names: list[str], n_val: int, seed: int) -> tuple[list[str], list[str]]:
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n_val = min(max(n_val, 0), max(len(order) - 1, 0))
    return sorted(order[n_val:]), sorted(order[:n_val])


def _run_name(mode: str, band: float, foundation: str) -> str:
    return f"student-{mode}" + (f"-band{band:g}" if mode == "sdm" else "") + f"-{foundation}"


def train(cohorts: list[Path], work: Path, *, label_mapping: str | None, stage: str, val: int, foundation: str,
          checkpoint: str | None, device: str | None, threads: int | None, prompter_steps: int, student_steps: int,
          steps_per_epoch: int, lr: float, max_minutes: float | None, mode: str, band: float, jitter: int, shard: str,
          boundary_weight: float, patch: int, seed: int, resume: bool, export: Path | None, context: bool = False,
          init: Path | None = None, mirror: float = 0.0, split: Path | None = None,
          prompter_init: Path | None = None, elastic: float = 0.0) -> None:
    """Run the training stages (module docstring) on ``cohorts`` in the working folder ``work``.

    Args:
        cohorts: cohort folders in nnU-Net layout; case names must be unique across them.
        stage: ``"all"`` or one of :data:`STAGES`.
        val: validation cases taken out of training by a seeded shuffle (to pick the best epoch).
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available).
        shard: ``"K/N"``: the cache stage does every N-th case from the K-th.
        export: a weights folder to copy the trained networks into, with its manifest (None: none).
        context: build the foundation cache with the 3-slice context (the pipeline's default at
            inference), in its own folder ``work/foundation/<backend>-ctx3``.
        init: a student checkpoint to start the student from (fine-tuning; same input mode).
        mirror: probability of the student's left-right mirror augmentation (0 = none).
        elastic: probability of the student's elastic deformation augmentation (0 = none).
        prompter_init: a prompter checkpoint to start the prompter from (fine-tuning).
        split: an earlier run's ``split.json``: its validation cases are validated on here too (all
            must be in ``cohorts``; ``val`` is then ignored), so a network fine-tuned on a larger
            cohort is never validated on a case it or its ``init`` was trained on.
        The others are ``basalseg train``'s options of the same names (``--help``).

    Raises:
        BasalSegError: repeated case names, a bad ``shard``.
    """
    import torch

    from ..data.cohort import read_cohort
    from ..errors import BasalSegError
    from ..foundation import make_backend, pick_device
    from ..networks import load_checkpoint
    from .foundation_cache import build_foundation_cache
    from .prepare import prepare_cases
    from .train_prompter import train_prompter
    from .train_student import train_student
    from .trainer import TrainConfig

    if threads:
        torch.set_num_threads(threads)
    device = pick_device(device)
    cases = [c for folder in cohorts for c in read_cohort(folder, label_mapping)]
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise BasalSegError("case names repeat across cohorts; rename them so each is unique")
    work = Path(work)
    stages = list(STAGES) if stage == "all" else [stage]
    if split is not None:
        try:
            val_names = sorted(json.loads(Path(split).read_text(encoding="utf-8"))["val"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BasalSegError(f"--split {split}: not a readable split.json with a 'val' list ({exc})") from exc
        unknown = sorted(set(val_names) - set(names))
        if unknown:
            raise BasalSegError(f"--split {split}: validation cases not in the cohorts: {', '.join(unknown)}")
        train_names = sorted(set(names) - set(val_names))
    else:
        train_names, val_names = _split(names, val, seed)
    (work).mkdir(parents=True, exist_ok=True)
    (work / "split.json").write_text(json.dumps({"train": train_names, "val": val_names}, indent=1))
    print(f"{len(cases)} cases: {len(train_names)} training, {len(val_names)} validation")

    prepared = {p.stem: p for p in prepare_cases(cases, work)}  # every stage needs them; cached
    prompter_dir = work / "prompter"
    if "prompter" in stages and not (prompter_dir / "prompter.pt").is_file():
        cfg = TrainConfig(prompter_steps, steps_per_epoch, lr, max_minutes=max_minutes, seed=seed)
        print("training the prompt generator:", train_prompter([prepared[n] for n in train_names],
                                                                [prepared[n] for n in val_names],
                                                                prompter_dir, cfg, resume, str(device),
                                                                init=prompter_init))
    from .foundation_cache import variant_name

    cache_dir = work / "foundation" / variant_name(foundation, context)
    if "cache" in stages:
        prompter, _ = load_checkpoint(prompter_dir / "prompter.pt", "prompter", device)
        backend = make_backend(foundation, checkpoint, str(device))
        from tqdm import tqdm

        k, n_shards = (int(v) for v in shard.split("/"))
        if not 0 <= k < n_shards:
            raise BasalSegError(f"--shard {shard}: need 0 <= K < N")
        mine = sorted(names)[k::n_shards]
        bar = tqdm(total=len(mine), desc=f"foundation cache ({foundation}, shard {shard})", unit="case")
        build_foundation_cache([prepared[n] for n in mine], prompter, backend, cache_dir, jitter=jitter,
                               seed=seed, device=device, context=context,
                               progress=lambda done, total: bar.update(done - bar.n))
        bar.close()
    run_dir = work / _run_name(mode, band, foundation)
    if "student" in stages and not (run_dir / "student.pt").is_file():
        cfg = TrainConfig(student_steps, steps_per_epoch, lr, max_minutes=max_minutes, seed=seed)
        print("training the student:", train_student([cache_dir / f"{n}.npz" for n in train_names],
                                                     [cache_dir / f"{n}.npz" for n in val_names], run_dir, cfg,
                                                     mode, band, resume, str(device),
                                                     a_max=boundary_weight, patch=patch, init=init,
                                                     mirror=mirror, elastic=elastic))
    if export:
        export_weights(prompter_dir / "prompter.pt", run_dir / "student.pt", export, foundation,
                       cohorts=[str(c) for c in cohorts])
        print(f"exported weights to {export}")


def describe_cohort(folder: str | Path) -> dict:
    """What a training cohort was, for a weights manifest: its name, size and, for a synthetic cohort
    (``basalseg synth``), the seed, templates, atlas and contrast it was generated with, and for
    head-like cohorts (``--head``) whether they were skull-stripped (``--skull-stripped``), put
    through the brain localisation (``--localised``: with the number of heads it dropped and its
    transform) and the probability of k-space artefacts (``--artefacts``); not the local path, which
    means nothing on another machine."""
    folder = Path(folder)
    out: dict = {"name": folder.name}
    try:
        data = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return out
    out["cases"] = data.get("numTraining")
    synth = data.get("basalseg_synth")
    if isinstance(synth, dict):
        cases = synth.get("cases", [])
        out.update({"synthetic": True, "generator_version": synth.get("generator_version"),
                    "cohort_seed": synth.get("cohort_seed"),
                    "templates": sorted({c.get("template") for c in cases if c.get("template")}),
                    "atlas": sorted({c.get("atlas") for c in cases if c.get("atlas")}),
                    "contrast": synth.get("config", {}).get("contrast")})
        head = synth.get("head")
        out["head"] = isinstance(head, dict)
        if isinstance(head, dict):
            out.update({"head_generator_version": synth.get("head_generator_version"),
                        "skull_stripped": bool(head.get("skull_stripped", False)),
                        "artefact_prob": float(head.get("artefact_prob", 0.0))})
    localised = data.get("basalseg_localised")
    if isinstance(localised, dict):
        out["localised"] = {"function": localised.get("function"), "dropped": localised.get("n_dropped"),
                            # cohorts localised before 2026-12-07 record no transform: they were rigid
                            "transform": localised.get("transform", "rigid")}
    return out


def export_weights(prompter: Path | None, student: Path, folder: Path, foundation: str, cohorts: list[str]) -> None:
    """Copy trained networks into a weights folder and record them in its manifest.

    ``prompter=None`` exports the student only (the folder's prompter and its manifest entry stay).
    """
    from ..networks import load_checkpoint
    from ..weights import write_manifest_entry

    folder.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    for kind, src, name, file in (("prompter", prompter, "prompter", "prompter.pt"),
                                  ("student", student, f"student-{foundation}", f"student_{foundation}.pt")):
        if src is None or not src.is_file():
            continue
        _, meta = load_checkpoint(src, kind)
        shutil.copyfile(src, folder / f".{file}.tmp")
        (folder / f".{file}.tmp").replace(folder / file)
        entry = {"name": name, "kind": kind, "file": file, "trained": bool(meta.get("trained")), "date": date,
                 "training": {"cohorts": [describe_cohort(c) for c in cohorts], **{k: v for k, v in meta.get("training", {}).items() if k != "cases"},
                              "n_cases": len(meta.get("training", {}).get("cases", []))}}
        if kind == "student":
            entry.update({"foundation": foundation, "input_mode": meta.get("input_mode"), "band": meta.get("band")})
        write_manifest_entry(folder, entry)
