"""One background run of the pipeline in its own temporary folder.

A :class:`BasalSegJob` owns a working folder (``input.nii.gz``, maybe ``prompts.json``, and the
command's ``out/``), a :class:`~.processrunner.ProcessRunner` and the result:

* :meth:`BasalSegJob.poll` forwards the runner's events. When the child succeeded, the output
  files are read into memory (:class:`JobResult`) and checked (labels on the input grid).
* On success, failure or cancel the working folder is deleted. Nothing here touches the MRML
  scene: the logic adds nodes from a :class:`JobResult` only after a successful run, so a
  cancelled or failed run leaves the scene as it was.

No Slicer or Qt import at module level (``slicer`` is only looked at to find ``PythonSlicer``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .processrunner import CANCELLED, FAILED, RUNNING, SUCCEEDED, ProcessRunner, RunnerEvent, pollUntilFinished

__all__ = ["JobResult", "BasalSegJob", "pythonExecutable", "moduleDirectory", "childEnvironment",
           "defaultCommandPrefix", "makeWorkDir", "JOB_KINDS"]

log = logging.getLogger("BasalSegSAM")

JOB_KINDS = ("prompts", "segment")


def moduleDirectory() -> Path:
    """The folder holding ``BasalSegSAM.py``, ``BasalSegSAMLib/`` and the ``basalseg`` package."""
    return Path(__file__).resolve().parent.parent


def pythonExecutable() -> str:
    """Python for child processes: Slicer's ``PythonSlicer`` inside Slicer, else this interpreter."""
    try:
        import slicer  # noqa: F401  (slicer-core has no ``app``; real Slicer has)

        inSlicer = getattr(slicer, "app", None) is not None
    except ImportError:
        inSlicer = False
    if inSlicer:
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


#: ``python -c`` bootstrap: put the module folder first on ``sys.path`` and run a module as
#: ``__main__``, so the child imports the bundled ``basalseg`` whatever environment the
#: interpreter's launcher (``PythonSlicer``) sets up. Arguments: module folder, module, its args.
BOOTSTRAP = ("import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); module = sys.argv.pop(1); "
             "runpy.run_module(module, run_name='__main__', alter_sys=True)")


def defaultCommandPrefix(kind: str, python: Optional[str] = None) -> list[str]:
    """The command (with its subcommand) a job of ``kind`` runs, before its own arguments:
    ``basalseg prompts`` for ``"prompts"``, the segment worker for ``"segment"``."""
    base = [python or pythonExecutable(), "-c", BOOTSTRAP, str(moduleDirectory())]
    if kind == "prompts":
        return base + ["basalseg", "prompts"]
    if kind == "segment":
        return base + ["BasalSegSAMLib.segmentworker"]
    raise ValueError(f"job kind must be one of {JOB_KINDS}, got {kind!r}")


def childEnvironment(extra: Optional[dict] = None) -> dict:
    """This process's environment plus the module folder on ``PYTHONPATH`` (so the child imports
    the bundled ``basalseg``), unbuffered output and no SAM-2 CUDA extension build."""
    env = dict(os.environ)
    paths = [str(moduleDirectory())] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("SAM2_BUILD_CUDA", "0")
    env.update(extra or {})
    return env


@dataclass
class JobResult:
    """What a successful job produced, read into memory.

    Attributes:
        kind: ``"prompts"`` or ``"segment"``.
        prompts: the prompts (``prompts.json``; for ``segment``, the prompts used).
        labels: ``(I, J, K)`` int16 FreeSurfer labelmap on the input grid (``segment`` only).
        affine: the labelmap's voxel-to-RAS matrix (equal to the input's).
        volumeRows: rows of ``volumes.csv`` (``segment`` only).
        provenance: ``provenance.json``.
        cache: the ``cache`` event (slices, reused, computed) when the worker sent one.
        done: the ``done`` event.
    """

    kind: str
    prompts: object = None
    labels: Optional[np.ndarray] = None
    affine: Optional[np.ndarray] = None
    volumeRows: list = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    done: dict = field(default_factory=dict)


def _readRows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = []
        for row in csv.DictReader(handle):
            parsed = {"structure": row["structure"], "label": int(row["label"]), "voxels": int(row["voxels"]),
                      "volume_mm3": float(row["volume_mm3"]), "volume_ml": float(row["volume_ml"])}
            for column in ("volume_ml_low", "volume_ml_high"):  # the 95 % interval, when the table has it
                if column in row:
                    value = (row.get(column) or "").strip()
                    parsed[column] = float(value) if value else None
            rows.append(parsed)
        return rows


class BasalSegJob:
    """A run of ``basalseg prompts`` or of the segment worker in a temporary folder.

    Args:
        kind: ``"prompts"`` or ``"segment"``.
        command: the full command line.
        workDir: the job's own folder (deleted when the job ends).
        outDir: the command's ``--out`` folder inside ``workDir``.
        inputShape, inputAffine: the input grid; a labelmap on another grid is refused.
        runner: the process runner (a new :class:`ProcessRunner` by default).
        env: the child's environment (default :func:`childEnvironment`).
        keepWorkDir: keep the folder after the job (debugging).
    """

    def __init__(self, kind: str, command: Sequence[str], workDir: str | os.PathLike, outDir: str | os.PathLike,
                 inputShape: Optional[tuple] = None, inputAffine: Optional[np.ndarray] = None,
                 runner: Optional[ProcessRunner] = None, env: Optional[dict] = None, keepWorkDir: bool = False):
        if kind not in JOB_KINDS:
            raise ValueError(f"job kind must be one of {JOB_KINDS}, got {kind!r}")
        self.kind = kind
        self.command = [str(c) for c in command]
        self.workDir = Path(workDir)
        self.outDir = Path(outDir)
        self.inputShape = tuple(inputShape) if inputShape is not None else None
        self.inputAffine = None if inputAffine is None else np.asarray(inputAffine, dtype=np.float64)
        self.runner = runner or ProcessRunner()
        self.env = env
        self.keepWorkDir = keepWorkDir
        self.result: Optional[JobResult] = None
        self.state = "idle"
        self.errorMessage = ""
        self._cacheEvent: dict = {}

    # -- forwarding -----------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.state in (SUCCEEDED, FAILED, CANCELLED)

    @property
    def succeeded(self) -> bool:
        return self.state == SUCCEEDED

    @property
    def overall(self) -> float:
        return self.runner.overall

    @property
    def stage(self) -> str:
        return self.runner.stage

    def start(self) -> "BasalSegJob":
        """Start the child. On failure to start, the folder is removed and ``OSError`` raised."""
        try:
            self.runner.start(self.command, cwd=str(self.workDir),
                              env=self.env if self.env is not None else childEnvironment())
        except OSError as exc:
            self.state = FAILED
            self.errorMessage = str(exc)
            self._cleanup()
            raise
        self.state = RUNNING
        return self

    def poll(self) -> list[RunnerEvent]:
        """The runner's new events; on the final one the outputs are read and the folder removed."""
        events = self.runner.poll()
        for event in events:
            if event.kind == "cache":
                self._cacheEvent = dict(event.data)
            if event.kind == "finished":
                self._onFinished()
        return events

    def cancel(self) -> None:
        """Stop the child (see :meth:`ProcessRunner.cancel`); the job ends ``cancelled`` on a later poll."""
        self.runner.cancel()

    def wait(self, timeout: Optional[float] = None, onEvent: Optional[Callable[[RunnerEvent], None]] = None) -> str:
        """Poll until the job is over (or ``timeout``); return the state."""
        return pollUntilFinished(self, timeout, onEvent=onEvent)

    def details(self) -> str:
        return self.runner.details()

    # -- the end --------------------------------------------------------------------------------
    def _onFinished(self) -> None:
        try:
            if self.runner.state == SUCCEEDED:
                try:
                    self.result = self._readOutputs()
                    self.state = SUCCEEDED
                except Exception as exc:
                    self.state = FAILED
                    self.errorMessage = f"the run finished but its results could not be read: {exc}"
                    log.exception("reading results of %s failed", self.kind)
            else:
                self.state = self.runner.state
                self.errorMessage = self.runner.errorMessage
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if not self.keepWorkDir:
            shutil.rmtree(self.workDir, ignore_errors=True)

    def _readOutputs(self) -> JobResult:
        from basalseg.prompts import load_prompts

        out = self.outDir
        result = JobResult(kind=self.kind, done=dict(self.runner.doneData), cache=dict(self._cacheEvent))
        result.prompts = load_prompts(out / "prompts.json")
        if (out / "provenance.json").is_file():
            result.provenance = json.loads((out / "provenance.json").read_text(encoding="utf-8"))
        if self.kind == "segment":
            import nibabel as nib

            image = nib.load(str(out / "segmentation.nii.gz"))
            labels = np.asarray(image.dataobj).astype(np.int16)
            affine = np.asarray(image.affine, dtype=np.float64)
            if self.inputShape is not None and labels.shape != self.inputShape:
                raise ValueError(f"the labelmap has shape {labels.shape}, the input {self.inputShape}")
            if self.inputAffine is not None and not np.allclose(affine, self.inputAffine, atol=1e-3):
                raise ValueError("the labelmap does not lie on the input volume's grid")
            result.labels, result.affine = labels, affine
            result.volumeRows = _readRows(out / "volumes.csv")
        return result


def makeWorkDir(tempRoot: Optional[str] = None, prefix: str = "BasalSegSAM-") -> Path:
    """A new private folder for one job (under ``tempRoot`` or the system's temporary folder)."""
    if tempRoot:
        Path(tempRoot).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=tempRoot))
