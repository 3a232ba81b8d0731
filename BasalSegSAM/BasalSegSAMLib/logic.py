"""The module's logic without the widget: start jobs from nodes, put results into the scene, export.

Usable from Slicer's Python console, from scripts and from tests (``slicer-core``)::

    from BasalSegSAMLib.logic import SegmentationLogic
    from BasalSegSAMLib.parameters import RunOptions

    logic = SegmentationLogic()
    prompts = logic.generatePrompts(volumeNode, RunOptions())          # blocking
    segmentationNode, tableNode, result = logic.segment(volumeNode, RunOptions(), prompts)

The widget uses the non-blocking pair instead: :meth:`SegmentationLogic.startSegment` returns a
running :class:`~.jobs.BasalSegJob`, a ``QTimer`` polls it, and
:meth:`SegmentationLogic.applySegmentResult` adds nodes once it succeeded. A failed or
cancelled job adds nothing.

How the child is started is injectable: ``commandPrefix`` (``kind -> [program, args...]``) and
``runnerFactory`` (a :class:`~.processrunner.ProcessRunner` factory), so tests run a small real
script in place of the heavy pipeline.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import slicer

from . import mrmlbridge
from .jobs import BasalSegJob, JobResult, childEnvironment, defaultCommandPrefix, makeWorkDir
from .parameters import RunOptions
from .processrunner import ProcessRunner, RunnerEvent

__all__ = ["SegmentationLogic", "JobFailed", "EXPORT_FORMATS", "safeFileName", "exportFileName"]

log = logging.getLogger("BasalSegSAM")

#: Export formats: name -> file suffix.
EXPORT_FORMATS = {"seg.nrrd": ".seg.nrrd", "nifti": ".nii.gz", "csv": ".csv"}


_UNSAFE = re.compile(r'[<>:"/\\|?*\x00-\x1f]+')
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{n}" for n in range(1, 10)), *(f"LPT{n}" for n in range(1, 10))}


def safeFileName(name: str, fallback: str = "volume") -> str:
    """``name`` made valid as a file name on Windows, macOS and Linux.

    Characters Windows refuses (``< > : " / \\ | ? *`` and control characters) become ``_``,
    trailing dots and spaces go, a reserved device name (``CON``, ``NUL.txt``, ``COM1`` ...) gets a
    leading ``_``, and an empty result is ``fallback``. E.g. ``"3: T1"`` -> ``"3_ T1"``.
    """
    text = _UNSAFE.sub("_", str(name or "")).strip().rstrip(". ")
    if not text:
        text = fallback
    if text.split(".")[0].strip().upper() in _RESERVED:
        text = "_" + text
    return text[:120]


def exportFileName(nodeName: str, fmt: str) -> str:
    """Default export file name for a volume node's result: ``<safe name>_basalseg<suffix>``."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    return f"{safeFileName(nodeName)}_basalseg{EXPORT_FORMATS[fmt]}"


class JobFailed(RuntimeError):
    """A blocking run failed or was cancelled; ``details`` holds the command and its last error lines."""

    def __init__(self, message: str, details: str = "", cancelled: bool = False):
        super().__init__(message)
        self.details = details
        self.cancelled = cancelled


class SegmentationLogic:
    """Start, finish and export BasalSegSAM runs on MRML nodes.

    Args:
        scene: the MRML scene (default ``slicer.mrmlScene``).
        commandPrefix: ``kind -> command prefix`` for ``"prompts"`` / ``"segment"`` (default
            :func:`~.jobs.defaultCommandPrefix`: ``basalseg prompts`` and the segment worker,
            run as modules with the module folder first on ``sys.path``).
        runnerFactory: makes the process runner of a job (default :class:`ProcessRunner`).
        tempRoot: where job folders and the slice-mask caches go (default: the system's).
        env: extra environment variables for the child.
    """

    def __init__(self, scene=None, commandPrefix: Optional[Callable[[str], list]] = None,
                 runnerFactory: Callable[[], ProcessRunner] = ProcessRunner, tempRoot: Optional[str] = None,
                 env: Optional[dict] = None):
        self._scene = scene
        self.commandPrefix = commandPrefix or defaultCommandPrefix
        self.runnerFactory = runnerFactory
        self.tempRoot = tempRoot
        self.env = dict(env or {})
        self._cacheDir: Optional[Path] = None

    @property
    def scene(self):
        return self._scene or slicer.mrmlScene

    # -- slice-mask caches ----------------------------------------------------------------------
    def cachePath(self, volumeNode) -> Path:
        """The foundation slice-mask cache file of a volume node (one per node, this session)."""
        if self._cacheDir is None:
            if self.tempRoot:
                Path(self.tempRoot).mkdir(parents=True, exist_ok=True)
            self._cacheDir = Path(tempfile.mkdtemp(prefix="BasalSegSAM-cache-", dir=self.tempRoot))
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", volumeNode.GetID() or volumeNode.GetName())
        return self._cacheDir / f"{safe}.npz"

    def clearCaches(self) -> None:
        """Forget every slice-mask cache (e.g. when the scene is closed)."""
        import shutil

        if self._cacheDir is not None:
            shutil.rmtree(self._cacheDir, ignore_errors=True)
            self._cacheDir = None

    # -- starting jobs --------------------------------------------------------------------------
    def _checkVolume(self, volumeNode):
        if volumeNode is None:
            raise ValueError("no input volume selected")
        volume = mrmlbridge.volumeFromNode(volumeNode)  # raises ValueError naming the problem
        if min(volume.shape) < 2:
            raise ValueError(f"volume '{volumeNode.GetName()}' is not 3D (shape {volume.shape})")
        return volume

    def _newJob(self, kind: str, volumeNode, options: RunOptions, extraArgs: list[str], promptSet=None) -> BasalSegJob:
        options = (options or RunOptions()).validate()
        volume = self._checkVolume(volumeNode)
        if promptSet is not None:
            from basalseg.spatial import canonical_grid

            promptSet.validate()
            promptSet.check_grid(canonical_grid(volume.shape, volume.affine))  # PromptsError: another image
        workDir = makeWorkDir(self.tempRoot)
        try:
            inputPath = workDir / "input.nii.gz"
            affine = mrmlbridge.writeVolumeNifti(volumeNode, str(inputPath))
            outDir = workDir / "out"
            args = [str(inputPath), "--out", str(outDir), "--progress", "json"]
            if promptSet is not None:
                from basalseg.prompts import save_prompts

                promptsPath = workDir / "prompts.json"
                save_prompts(promptSet, promptsPath)
                args += ["--prompts", str(promptsPath)]
            args += extraArgs
            command = list(self.commandPrefix(kind)) + args
            return BasalSegJob(kind, command, workDir, outDir, inputShape=volume.shape, inputAffine=affine,
                               runner=self.runnerFactory(), env=childEnvironment(self.env))
        except Exception as exc:
            import shutil

            shutil.rmtree(workDir, ignore_errors=True)
            if isinstance(exc, OSError):  # e.g. ENOSPC from nibabel, which names no file
                reason = "disk full" if exc.errno == 28 else (exc.strerror or str(exc))
                raise OSError(exc.errno, f"cannot write the job's files into {workDir.parent}: {reason}") from exc
            raise

    def startGeneratePrompts(self, volumeNode, options: Optional[RunOptions] = None) -> BasalSegJob:
        """Start ``basalseg prompts`` on a volume node in the background; returns the running job.

        Raises:
            ValueError: no or unusable volume, bad options.
        """
        options = options or RunOptions()
        job = self._newJob("prompts", volumeNode, options, options.commonArgs())
        return job.start()

    def startSegment(self, volumeNode, options: Optional[RunOptions] = None, promptSet=None) -> BasalSegJob:
        """Start the whole pipeline on a volume node in the background; returns the running job.

        Args:
            volumeNode: input T1.
            options: run options.
            promptSet: prompts to use (e.g. edited); None lets the prompt generator make them.
                Foundation masks of slices whose prompts did not change since the last run on
                this node are reused (slice-mask cache).

        Raises:
            ValueError: no or unusable volume, bad options. basalseg.errors.PromptsError: the
            prompts are invalid or were made for another image.
        """
        options = options or RunOptions()
        extra = options.segmentArgs() + ["--cache", str(self.cachePath(volumeNode))]
        job = self._newJob("segment", volumeNode, options, extra, promptSet)
        return job.start()

    # -- finishing ------------------------------------------------------------------------------
    def applySegmentResult(self, result: JobResult, volumeNode, segmentationNode=None, onConflict: str = "new",
                           tableNode=None) -> tuple:
        """Add a successful segment result to the scene.

        Args:
            result: the job's result.
            volumeNode: the input volume.
            segmentationNode: target segmentation (None: a new one); see ``onConflict``.
            onConflict: ``"new"``, ``"replace"`` or ``"error"`` when the target already has
                segments named like the structures (see :func:`.mrmlbridge.labelsToSegmentation`).
            tableNode: volumes table to overwrite; None: the segmentation's own table (see
                :meth:`volumesTableFor`), made when it has none.

        Every segmentation has its own volumes table, named after it and referenced from it, so
        a second result in a new segmentation never overwrites the first one's volumes. A
        closed-surface representation is made so the 3D view shows the result.

        Returns:
            ``(segmentationNode, tableNode)``.
        """
        if result is None or result.kind != "segment" or result.labels is None:
            raise ValueError("not a segmentation result")
        segmentationNode = mrmlbridge.labelsToSegmentation(result.labels, volumeNode, segmentationNode, onConflict)
        tableNode = self.updateVolumesTable(segmentationNode, volumeNode, tableNode, labels=result.labels,
                                            intervals=mrmlbridge.intervalsFromRows(result.volumeRows))
        segmentationNode.CreateClosedSurfaceRepresentation()
        return segmentationNode, tableNode

    # -- blocking front -------------------------------------------------------------------------
    @staticmethod
    def _waitOrRaise(job: BasalSegJob, timeout: Optional[float], onEvent) -> JobResult:
        state = job.wait(timeout=timeout, onEvent=onEvent)
        if not job.finished:
            job.cancel()
            job.wait(timeout=30)
            raise JobFailed(f"the {job.kind} run took longer than {timeout} s and was cancelled", job.details(), True)
        if state != "succeeded":
            raise JobFailed(job.errorMessage or f"the {job.kind} run was {state}", job.details(), state == "cancelled")
        return job.result

    def generatePrompts(self, volumeNode, options: Optional[RunOptions] = None, timeout: Optional[float] = None,
                        onEvent: Optional[Callable[[RunnerEvent], None]] = None):
        """Run the prompt generator and wait; returns the ``PromptSet``.

        Raises:
            ValueError: bad input. JobFailed: the run failed or was cancelled (message = cause).
        """
        start = time.perf_counter()
        result = self._waitOrRaise(self.startGeneratePrompts(volumeNode, options), timeout, onEvent)
        log.info("prompts: %d on %d slices in %.1f s", len(result.prompts.prompts), len(result.prompts.slices()),
                 time.perf_counter() - start)
        return result.prompts

    def segment(self, volumeNode, options: Optional[RunOptions] = None, promptSet=None, segmentationNode=None,
                onConflict: str = "new", tableNode=None, timeout: Optional[float] = None,
                onEvent: Optional[Callable[[RunnerEvent], None]] = None) -> tuple:
        """Run the whole pipeline, wait, and add the result to the scene.

        Returns:
            ``(segmentationNode, tableNode, result)``.

        Raises:
            ValueError: bad input. JobFailed: the run failed or was cancelled (nothing is added).
        """
        start = time.perf_counter()
        result = self._waitOrRaise(self.startSegment(volumeNode, options, promptSet), timeout, onEvent)
        segmentationNode, tableNode = self.applySegmentResult(result, volumeNode, segmentationNode, onConflict, tableNode)
        log.info("segmentation finished in %.1f s", time.perf_counter() - start)
        return segmentationNode, tableNode, result

    # -- volumes and export ---------------------------------------------------------------------
    def volumesTableFor(self, segmentationNode):
        """The segmentation's own volumes table, or None when it has none yet."""
        return mrmlbridge.volumesTableOf(segmentationNode)

    def updateVolumesTable(self, segmentationNode, volumeNode, tableNode=None, labels=None, intervals=None):
        """Recompute the volumes table from the segmentation as it is now (e.g. after manual edits).

        Args:
            segmentationNode, volumeNode: the result and its input volume (grid, voxel volume).
            tableNode: the table to fill; None: the segmentation's own table, made (named
                ``"<segmentation> volumes"``) and referenced from the segmentation when missing.
            labels: the labelmap when already at hand (else read from the segmentation).
            intervals: the run's volume intervals (:func:`.mrmlbridge.intervalsFromRows`), only for
                the labels the run produced; after manual edits there are none (None).
        """
        if labels is None:
            labels = mrmlbridge.labelsFromSegmentation(segmentationNode, volumeNode)
        tableNode = tableNode or self.volumesTableFor(segmentationNode)
        voxelVolume = float(abs(np.linalg.det(mrmlbridge.worldAffine(volumeNode)[:3, :3])))
        tableNode = mrmlbridge.volumesToTable(labels, voxelVolume, tableNode, scene=self.scene,
                                              name=f"{segmentationNode.GetName()} volumes", intervals=intervals)
        segmentationNode.SetNodeReferenceID(mrmlbridge.TABLE_REFERENCE, tableNode.GetID())
        return tableNode

    def export(self, segmentationNode, volumeNode, path: str, fmt: Optional[str] = None,
               overwrite: bool = False) -> Path:
        """Write the segmentation as it is now to ``path``.

        Args:
            segmentationNode, volumeNode: the result and its input volume (grid).
            path: the file to write (written atomically).
            overwrite: replace an existing file (the user confirmed it); never the volume's own file.
            fmt: ``"seg.nrrd"`` (Slicer segmentation, 8 named coloured segments, FreeSurfer label
                values), ``"nifti"`` (int16 labelmap, FreeSurfer values) or ``"csv"`` (volumes);
                None guesses from the suffix.

        The file is in world coordinates: a parent (linear) transform of the volume is applied.

        Raises:
            ValueError: no nodes, unknown format.
            OutputExistsError: ``path`` exists and ``overwrite`` is False, or it is the file the
                input volume was loaded from.
        """
        from basalseg.errors import OutputExistsError
        from basalseg.outputs import atomic_write_bytes, nifti_bytes, seg_nrrd_bytes, volume_rows, volumes_csv_text

        if segmentationNode is None or volumeNode is None:
            raise ValueError("export needs a segmentation and its input volume")
        path = Path(path)
        if fmt is None:
            name = path.name.lower()
            fmt = next((f for f, suffix in EXPORT_FORMATS.items() if name.endswith(suffix)),
                       "nifti" if name.endswith(".nii") else None)
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"unknown export format for {path.name}; use .seg.nrrd, .nii.gz or .csv")
        storage = volumeNode.GetStorageNode() if hasattr(volumeNode, "GetStorageNode") else None
        source = storage.GetFileName() if storage is not None else None
        if source and path.exists() and Path(source).resolve() == path.resolve():
            raise OutputExistsError(f"{path} is the file the input volume was loaded from; choose another file name")
        if path.exists() and not overwrite:
            raise OutputExistsError(f"{path} already exists; choose another file name or confirm replacing it")
        labels = mrmlbridge.labelsFromSegmentation(segmentationNode, volumeNode)
        affine = mrmlbridge.worldAffine(volumeNode)
        if fmt == "seg.nrrd":
            data = seg_nrrd_bytes(labels, affine)
        elif fmt == "nifti":
            data = nifti_bytes(labels, affine)
        else:
            data = volumes_csv_text(volume_rows(labels, float(abs(np.linalg.det(affine[:3, :3]))))).encode("utf-8")
        atomic_write_bytes(path, data)
        return path
