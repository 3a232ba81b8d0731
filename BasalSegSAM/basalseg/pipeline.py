"""The whole method, stage by stage, usable from a shell, from tests and from Slicer.

1. input -> canonical 1 mm RAS (:mod:`basalseg.spatial`), intensities to [0, 1]
2. prompt generator -> per-slice boxes and points (:mod:`basalseg.prompter`)
3. frozen foundation backend per slice -> stacked 3D masks (:mod:`basalseg.foundation`)
4. masks -> SDM channels (:mod:`basalseg.sdm`)
5. student U-Net on [T1, SDM] -> labelmap (:mod:`basalseg.student`), back on the input grid

Networks and the backend are passed in or loaded lazily, so tests can use small real ones.
Structures the prompt generator does not find get no prompts and are left empty in the output
(never invented by the student); when it finds none at all, :class:`NothingFoundError` says so.

Two options change stage 3-4 (``docs/CONTEXT_AND_PLANES.md``):

* ``context`` (on by default, ``--no-context`` turns it off; it improved the held-out Dice and
  HD95 on both cohorts): the foundation model's 3 colour channels are slices ``k-1, k, k+1``
  instead of slice ``k`` repeated (:mod:`basalseg.foundation.slices`).
* ``planes`` (axial only by default; ``--planes axial,coronal,sagittal``): the foundation model
  also runs on coronal and sagittal slices, prompted from the prompt generator's labelmap along
  those axes (:func:`basalseg.prompts.plane_prompt_sets`, as the training cache); each plane's masks give SDM
  channels and the student reads their per-structure mean (:func:`basalseg.sdm.fused_sdm_channels`;
  still 8 channels). ``SegmentResult.masks`` (QC, foundation/student agreement) is the per-structure
  majority vote of the planes (:func:`basalseg.sdm.majority_vote`). ``prompts.json`` stays the
  axial prompts; the other planes' prompts are recorded in ``provenance.json`` under
  ``multi_plane``. With user-given (edited) axial prompts, the prompt generator still runs to
  prompt the other planes; the edits apply to the axial plane only, and a structure absent from
  the given prompts is left out of every plane.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import __version__
from .errors import BasalSegError, Cancelled, CheckpointError, PromptsError
from .foundation import FoundationBackend, SliceMaskCache, make_backend, pick_device
from .foundation.boxed import BoxedMasks, hull
from .foundation.runner import default_batch, run_planes
from .imageio import Volume
from .inputcheck import check_t1_like, thick_slice_flags
from .intensity import conform_intensities, normalize01, saturation_flag
from .prompter import generate_prompts, predict_coarse
from .prompts import PromptSet, normalise_planes, plane_prompt_sets
from .sdm import DEFAULT_BAND, majority_vote
from .spatial import Grid, bounding_box, resample_to_grid, to_canonical
from .structures import STRUCTURES, classes_to_labels
from .student import build_student_input, predict_student, student_roi
from .uncertainty import UNCERTAINTY_MODES, flip_probabilities, softmax_measures

__all__ = ["PipelineConfig", "Pipeline", "SegmentResult", "NothingFoundError", "ProgressFn"]

log = logging.getLogger("basalseg")

#: ``progress(stage, fraction)``: stage is one of "prepare", "prompter", "foundation", "sdm",
#: "student", "resample"; fraction in [0, 1] within that stage.
ProgressFn = Callable[[str, float], None]


#: below this many mL of the prompter's labelmap (all structures together) nothing counts as found.
MIN_FOUND_ML = 0.5


class NothingFoundError(BasalSegError):
    """The prompt generator found none of the structures (not a brain T1, or they are outside the field of view)."""


@dataclass
class PipelineConfig:
    """Options of a run (all have working defaults).

    Attributes:
        foundation: ``"litemedsam"`` (offline default) or ``"sam2"``.
        checkpoint: foundation weights (file, or SAM-2 catalogue name); None = backend default.
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available).
        weights_dir: folder with the prompter/student manifest; None = shipped weights.
        prompter_checkpoint, student_checkpoint: explicit checkpoint files (override the manifest).
        band: SDM band half-width in voxels; None = the band the student was trained with.
        crop: crop each slice to its region of interest before the foundation encoder.
        stride: encode every ``stride``-th prompted slice (plus each structure's first and last)
            and interpolate the others (1 = every slice; see :func:`basalseg.foundation.stride.plan_slices`).
        batch: slices per encoder batch; None = 1 on CPU (batches are slower there), 8 on CUDA.
        threads: torch CPU threads (None = torch's default).
        min_prompt_pixels: a structure needs this many prompter pixels on a slice to get a prompt.
        context: 3-slice context (the default): the foundation model's colour channels are slices
            ``k-1, k, k+1`` (clamped at the volume's ends) instead of slice ``k`` repeated; it
            improved the held-out Dice and HD95 on both cohorts at no cost
            (docs/CONTEXT_AND_PLANES.md).
        planes: foundation planes, a tuple of ``"axial"``, ``"coronal"``, ``"sagittal"`` (any
            order; run in that fixed order). More than one: multi-plane fusion (module docstring).
        calibrate: apply the student's volume calibration (per-structure logit offsets recorded in
            its checkpoint, :mod:`basalseg.calibration`) when it has one.
        uncertainty: per-structure volume uncertainty (:mod:`basalseg.uncertainty`): ``"softmax"``
            (default; from the student's softmax of the same pass, no extra network run),
            ``"flip"`` (also one left-right mirrored student pass, a diagnostic) or ``"none"``
            (``--no-uncertainty``).
        localise: ``"auto"``, ``"on"`` or ``"off"`` (this class's default; the command line's is
            ``auto``): brain localisation for whole-head inputs in any pose and its QC checks
            (:mod:`basalseg.localise`).
        localise_transform: ``"affine"`` (default since 2026-12-07: the rigid registration refined
            to 12 parameters, so the networks see the brain at the template's size and shape) or
            ``"rigid"`` (before; :func:`basalseg.localise.localise`).
        mirror_tta: left-right test-time augmentation of the student (the default): the mean of its
            logits on the crop and on the crop's mirror image (:func:`basalseg.student.predict_student`),
            one more student pass (about 0.6 s on 2 CPU cores); held-out Dice +0.001 to +0.002 and
            HD95 lower on every cohort (README "Results").
    """

    foundation: str = "litemedsam"
    checkpoint: str | None = None
    device: str | None = None
    weights_dir: str | None = None
    prompter_checkpoint: str | None = None
    student_checkpoint: str | None = None
    band: float | None = None
    crop: bool = True
    stride: int = 1
    batch: int | None = None
    threads: int | None = None
    min_prompt_pixels: int = 4
    backend_options: dict = field(default_factory=dict)
    context: bool = True
    planes: tuple = ("axial",)
    calibrate: bool = True
    uncertainty: str = "softmax"
    localise: str = "off"
    localise_transform: str = "affine"
    mirror_tta: bool = True


@dataclass
class SegmentResult:
    """Everything a run produced.

    Attributes:
        volume: the input (its grid and affine are the output's).
        labels: ``volume.shape`` int16 labelmap, FreeSurfer values.
        grid: the canonical grid used internally.
        image01: canonical image in [0, 1].
        classes: canonical class-index labelmap (the student's output).
        coarse: the prompter's canonical labelmap.
        masks: ``(8, X, Y, Z)`` stacked foundation masks, as
            :class:`~basalseg.foundation.boxed.BoxedMasks` (stored in the box of the slices' crops;
            ``np.asarray(result.masks)`` gives the full array).
        prompts: the prompts used.
        timings: seconds per stage.
        provenance: versions, backend, weights, options.
        missing: structure keys that got no prompts (left empty).
        plane_masks: with several planes, ``(P, 8, X, Y, Z)`` boxed masks per plane (in
            ``PipelineConfig.planes`` order; ``masks`` is then their majority vote); else None.
        plane_prompts: the prompts of each plane run (``{"axial": prompts, "coronal": ...}``).
        uncertainty: raw per-structure volume-uncertainty measures on the canonical grid
            (``{"mode", "measures": {structure name: {...}}, "seconds"}``,
            :func:`basalseg.uncertainty.softmax_measures`), or None when switched off.
    """

    volume: Volume
    labels: np.ndarray
    grid: Grid
    image01: np.ndarray
    classes: np.ndarray
    coarse: np.ndarray | None
    masks: np.ndarray
    prompts: PromptSet
    timings: dict
    provenance: dict
    missing: list[str]
    plane_masks: np.ndarray | None = None
    plane_prompts: dict | None = None
    uncertainty: dict | None = None
    probabilities: np.ndarray | None = None
    roi: tuple | None = None


class Pipeline:
    """Runs the stages; networks are loaded on first use unless passed in.

    Args:
        config: options.
        backend: a foundation backend instance (else built from ``config``).
        prompter, student: networks (else loaded from the weights manifest or checkpoint files).
        student_meta: the ``meta`` record of a ``student`` passed in (its input mode, SDM band and
            calibration, :meth:`student_mode`, :meth:`student_offsets`); a student loaded here
            brings its own.
    """

    def __init__(self, config: PipelineConfig | None = None, backend: FoundationBackend | None = None,
                 prompter: torch.nn.Module | None = None, student: torch.nn.Module | None = None,
                 student_meta: dict | None = None):
        self.config = config or PipelineConfig()
        try:
            self.planes = normalise_planes(self.config.planes)
        except ValueError as exc:
            raise BasalSegError(f"planes: {exc}") from None
        if self.config.threads:
            torch.set_num_threads(int(self.config.threads))
        self.device = pick_device(self.config.device)
        if self.device.type == "cuda":
            # Same input, same weights, same GPU -> same labelmap: no autotuned (run-dependent)
            # convolution algorithms, and deterministic kernels where torch has them.
            import os

            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
            torch.use_deterministic_algorithms(True, warn_only=True)
        self._backend = backend
        self._prompter = prompter
        self._student = student
        self.student_meta: dict = dict(student_meta or {})
        self.weights_info: dict = {}

    def with_config(self, config: PipelineConfig) -> "Pipeline":
        """A pipeline with other options that shares this one's backend and networks (those loaded
        so far), with their metadata: for comparing options without loading the models again."""
        other = Pipeline(config, backend=self._backend, prompter=self._prompter, student=self._student,
                         student_meta=self.student_meta)
        other.weights_info = dict(self.weights_info)
        return other

    # -- lazily loaded parts -------------------------------------------------------------
    @property
    def backend(self) -> FoundationBackend:
        if self._backend is None:
            self._backend = make_backend(self.config.foundation, self.config.checkpoint, str(self.device),
                                         **self.config.backend_options)
        return self._backend

    def _load(self, kind: str) -> torch.nn.Module:
        from .weights import load_model

        checkpoint = self.config.prompter_checkpoint if kind == "prompter" else self.config.student_checkpoint
        foundation = None if kind == "prompter" else self.config.foundation
        net, info = load_model(kind, foundation, self.config.weights_dir, checkpoint, device=self.device)
        self.weights_info[kind] = {k: info[k] for k in ("file", "sha256", "trained")}
        if kind == "student":
            self.student_meta = dict(info.get("meta") or {})
        return net

    def student_mode(self) -> tuple[str, float]:
        """The student's input mode and SDM band. The band is ``config.band`` when set, else the one
        the student was trained with (recorded in its checkpoint), else :data:`DEFAULT_BAND`."""
        meta = self.student_meta
        mode = meta.get("input_mode", "sdm")
        trained = meta.get("band")
        band = float(self.config.band if self.config.band is not None else (trained or DEFAULT_BAND))
        if trained is not None and band != float(trained):
            log.warning("the student was trained with SDM band %s but band %s was asked for", trained, band)
        return mode, band

    def student_offsets(self) -> np.ndarray | None:
        """The student's calibration offsets ``(9,)`` when it has them and ``config.calibrate``."""
        from .calibration import offsets_from_meta

        if not self.config.calibrate:
            return None
        try:
            return offsets_from_meta(self.student_meta)
        except ValueError as exc:
            raise CheckpointError(f"student checkpoint: {exc}") from exc

    @property
    def prompter(self) -> torch.nn.Module:
        if self._prompter is None:
            self._prompter = self._load("prompter")
        return self._prompter.to(self.device).eval()

    @property
    def student(self) -> torch.nn.Module:
        if self._student is None:
            self._student = self._load("student")
        return self._student.to(self.device).eval()

    # -- stages ----------------------------------------------------------------------------
    def prepare(self, volume: Volume) -> tuple[np.ndarray, Grid]:
        """Canonical 1 mm image in [0, 1] and its grid.

        Raises:
            InputImageError: the input cannot be a T1 of the basal ganglia (a label image, a slab
                thinner than the structures; :func:`basalseg.inputcheck.check_t1_like`).
        """
        check_t1_like(volume)
        data, grid = to_canonical(volume)
        return normalize01(data), grid

    def generate_prompts(self, volume: Volume, prepared: tuple[np.ndarray, Grid] | None = None
                         ) -> tuple[PromptSet, np.ndarray, np.ndarray, Grid]:
        """Stage 2 only: ``(prompts, coarse_classes, image01, grid)``."""
        image01, grid = prepared or self.prepare(volume)
        prompts, coarse = generate_prompts(self.prompter, image01, grid, self.device,
                                           min_pixels=self.config.min_prompt_pixels)
        region = bounding_box(coarse > 0)  # recorded: a run given these prompts crops as this one (_given_region)
        prompts.source.update({"image": volume.path,
                               "prompter_region": None if region is None else [[s.start, s.stop] for s in region]})
        return prompts, coarse, image01, grid

    @staticmethod
    def conformed(volume: Volume) -> Volume:
        """The input with the intensities every stage expects
        (:func:`basalseg.intensity.conform_intensities`: an offset, negative voxels, lone extreme
        voxels); what was changed is logged as a warning and kept in ``meta["notes"]`` (recorded
        in ``provenance.json`` ``input.notes``). An ordinary T1 is returned as it is."""
        data, notes = conform_intensities(volume.data)
        if not notes:
            return volume
        for note in notes:
            log.warning("%s: %s", volume.path or "image", note)
        meta = {**volume.meta, "notes": list(volume.meta.get("notes") or []) + notes}
        return Volume(data, volume.affine, volume.path, meta)

    @staticmethod
    def _qc_flags(result: SegmentResult, volume: Volume) -> list[dict]:
        """The result's QC flags (:mod:`basalseg.scan_qc`), the saturated image's and thick slices'."""
        from .scan_qc import scan_flags

        flags = scan_flags(result.labels, volume.voxel_volume_mm3, result.missing,
                           result.provenance.get("foundation_student_dice"))
        saturated = saturation_flag(volume.data)
        return flags + ([saturated] if saturated else []) + thick_slice_flags(volume.spacing)

    def prompts_for(self, volume: Volume) -> tuple[PromptSet, np.ndarray, np.ndarray, Grid, "Localisation"]:
        """Stage 2 as :meth:`segment` runs it: localised first when ``config.localise`` says so.

        Returns ``(prompts, coarse_classes, image01, grid, localisation)``. For a localised input
        the prompts are on the brain template's grid and record the transform in
        ``source["localisation"]`` (:meth:`PromptSet.template_to_input`), so that ``segment`` with
        them (edited or not) localises the input again with exactly that transform.
        """
        from .localise import localise

        volume = self.conformed(volume)
        work, loc = localise(volume, self.config.localise or "off", threads=self.config.threads or 1,
                             transform=self.config.localise_transform)
        prompts, coarse, image01, grid = self.generate_prompts(work)  # records work.path = volume.path
        if loc.applied:
            prompts.source["localisation"] = _prompt_localisation(loc)
        return prompts, coarse, image01, grid, loc

    def segment(self, volume: Volume, prompts: PromptSet | None = None, progress: ProgressFn | None = None,
                should_stop: Callable[[], bool] | None = None, cache: SliceMaskCache | None = None) -> SegmentResult:
        """Run every stage on a checked input volume, localised first when ``config.localise`` says so
        (:mod:`basalseg.localise`: the stages then run on the brain resampled into template space,
        and the labelmap is mapped back onto the input grid from the student's probabilities).
        Arguments and errors as :meth:`segment_as_given`, plus ``NoBrainFoundError`` and
        ``NotT1Error`` from the localisation checks."""
        from .localise import localise, map_back

        volume = self.conformed(volume)
        mode = self.config.localise or "off"
        prompt_transform = prompts.template_to_input() if prompts is not None else None
        if mode == "off" and prompt_transform is not None:
            raise PromptsError("these prompts were made on the localised (brain-template-aligned) image "
                               "(source.localisation in prompts.json); run with --localise auto or on, not off")
        if mode == "off":
            result = self.segment_as_given(volume, prompts, progress, should_stop, cache)
            result.provenance["qc_flags"] = self._qc_flags(result, volume)
            return result
        t0 = time.perf_counter()
        if prompt_transform is not None:
            # a localised image's prompts (basalseg prompts / Slicer): on the template grid, under
            # the transform they were made with; the same transform again, so edits stay in place
            work, loc = localise(volume, "on", threads=self.config.threads or 1, template_to_input=prompt_transform)
        elif mode == "auto" and prompts is not None:
            # given prompts are on the grid of the image as it is: no localisation (with "on" they
            # must be on the template grid, i.e. a localised run's prompts.json)
            from .localise import Localisation

            work, loc = volume, Localisation(mode, False, "auto: prompts were given (on the input's own grid); not localised")
        else:
            work, loc = localise(volume, mode, threads=self.config.threads or 1, transform=self.config.localise_transform)
        if not loc.applied:
            result = self.segment_as_given(volume, prompts, progress, should_stop, cache)
        else:
            result = self.segment_as_given(work, prompts, progress, should_stop, cache, keep_probabilities=True)
            # prompts.json of a localised run is on the template grid: it says so, with the transform
            result.prompts.source["localisation"] = _prompt_localisation(loc)
            t = time.perf_counter()
            classes_in = map_back(result.probabilities, result.roi, loc, volume)
            result.labels = classes_to_labels(classes_in).astype(np.int16, copy=False)
            result.volume = volume
            _to_input_ml(result.uncertainty, loc)
            result.timings["map_back"] = time.perf_counter() - t
        result.timings["localise"] = loc.seconds
        result.timings["total"] = time.perf_counter() - t0
        result.provenance["localisation"] = loc.to_dict()
        result.provenance["qc_flags"] = self._qc_flags(result, volume)
        return result

    def segment_as_given(self, volume: Volume, prompts: PromptSet | None = None, progress: ProgressFn | None = None,
                         should_stop: Callable[[], bool] | None = None, cache: SliceMaskCache | None = None,
                         keep_probabilities: bool = False) -> SegmentResult:
        """Run every stage on a checked input volume, without localisation.

        Args:
            volume: input (see :func:`basalseg.imageio.load_volume`).
            prompts: prompts to use instead of the prompt generator's (e.g. edited ones); they
                must be on this image's canonical grid.
            progress: stage progress callback.
            should_stop: polled between steps; True cancels (raises :class:`Cancelled`).
            cache: foundation masks of unchanged slices are reused from it (and it is updated).
            keep_probabilities: keep the student's ``(9, *roi)`` probabilities (``result.probabilities``,
                ``result.roi``; structures without prompts set to 0).

        Raises:
            NothingFoundError: no structure found. PromptsError: prompts for another grid.
            Cancelled: ``should_stop`` returned True.
        """
        stages = _Stages(progress, should_stop)
        report, timings = stages.report, stages.timings

        t0 = time.perf_counter()
        report("prepare", 0.0)
        # Load every network first: a missing or corrupt checkpoint fails in seconds, not after
        # minutes of foundation-model work.
        with stages.timed("load"):
            other_planes = [p for p in self.planes if p != "axial"]
            if prompts is None or other_planes:  # coronal/sagittal prompts always come from the prompter
                _ = self.prompter
            _ = self.student, self.backend
        with stages.stage("prepare"):
            image01, grid = self.prepare(volume)

        coarse = None
        given = prompts is not None
        with stages.stage("prompter", begin=not given, end=not given):
            if prompts is None:
                prompts, coarse, _, _ = self.generate_prompts(volume, (image01, grid))
            else:
                prompts.check_grid(grid)
                if prompts.axis != 2:
                    raise BasalSegError(f"given prompts must be axial, got {prompts.plane} prompts")
            found = prompts.structures_found()
            missing = [s.key for s in STRUCTURES if s.key not in found]
            if not found and given:
                raise PromptsError("the given prompts hold no prompt for any structure (an empty prompts file?); "
                                   "add prompts or run without --prompts to use the prompt generator")
            if not found:
                raise NothingFoundError(
                    "the prompt generator found none of the 8 structures in this image; is it a brain T1 "
                    "that covers the basal ganglia and thalamus?")
            found_ml = None if given else float(np.count_nonzero(coarse)) * abs(float(np.linalg.det(grid.affine[:3, :3]))) / 1000
            if found_ml is not None and found_ml < MIN_FOUND_ML:  # specks in noise (--localise off skips the brain check)
                raise NothingFoundError(
                    f"the prompt generator found only {found_ml:.2f} mL of the 8 structures together in this image "
                    f"(the smallest, a pallidum, has about {MIN_FOUND_ML:g} mL or more); is it a brain T1 that covers "
                    "the basal ganglia and thalamus?")
            if missing:
                log.warning("no prompts for %s: left empty", ", ".join(missing))
            plane_prompts, plane_note = self._plane_prompts(prompts, coarse, image01)

        plane_timings: dict = {}
        with stages.stage("foundation", end=False):  # the runner reports the slices done
            stacked = run_planes(self.backend, image01, [plane_prompts[p] for p in self.planes],
                                 progress=lambda done, total: report("foundation", done / max(total, 1)),
                                 timings=plane_timings, crop=self.config.crop,
                                 batch=self.config.batch or default_batch(self.device), stride=self.config.stride,
                                 cache=cache, should_stop=stages.stop, context=bool(self.config.context), boxed=True)
            multi = len(self.planes) > 1  # stacked: BoxedMasks (P, 8, ...), stored in the box of the slices' crops
            masks = BoxedMasks(majority_vote(stacked.data), stacked.box, grid.shape) if multi else stacked.channel(0)

        with stages.stage("sdm"):
            student = self.student
            mode, band = self.student_mode()
            # given prompts: the prompter's region of the run that wrote them (prompts.json records it),
            # so that unedited prompts reproduce that run and an edit changes only what it edits
            roi = student_roi(stacked, coarse, region=None if coarse is not None else _given_region(prompts))
            # one plane: its (8, ...) masks; several: (P, 8, ...), fused into 8 SDM channels
            foundation_input = stacked.crop(roi) if multi else masks.crop(roi)
            inputs = build_student_input(image01[roi], foundation_input, mode, band)

        with stages.stage("student", begin=True, end=False):  # ends after the uncertainty below
            mode_u = self.config.uncertainty or "none"
            if mode_u not in UNCERTAINTY_MODES:
                raise BasalSegError(f"uncertainty must be one of {', '.join(UNCERTAINTY_MODES)}; got {mode_u!r}")
            offsets = self.student_offsets()
            crop_probs = None
            if keep_probabilities or mode_u != "none":
                crop_classes, crop_probs = predict_student(student, inputs, self.device, logit_offsets=offsets,
                                                           return_probabilities=True, mirror=self.config.mirror_tta)
            else:
                crop_classes = predict_student(student, inputs, self.device, logit_offsets=offsets,
                                               mirror=self.config.mirror_tta)
            missing_idx = [s.class_index for s in STRUCTURES if s.key in missing]
            for c in missing_idx:  # never invent a structure the prompter did not find
                crop_classes[crop_classes == c] = 0
                if crop_probs is not None:
                    crop_probs[0] += crop_probs[c]
                    crop_probs[c] = 0.0
            probs = crop_probs if mode_u != "none" else None
            classes = np.zeros(grid.shape, dtype=np.uint8)
            classes[roi] = crop_classes
        uncertainty = None
        if probs is not None:
            with stages.timed("uncertainty"):
                uncertainty = self._uncertainty(student, inputs, probs, crop_classes, missing_idx, grid, offsets, mode_u)
            uncertainty["seconds"] = timings["uncertainty"]
        report("student", 1.0)

        with stages.stage("resample", end=False):
            # nearest neighbour commutes with the class -> label map: resample the uint8 classes
            labels = classes_to_labels(resample_to_grid(classes, grid.affine, Grid(volume.shape, volume.affine), order=0))
        timings["total"] = time.perf_counter() - t0
        if stages.stop():
            raise Cancelled("cancelled during the resample stage")
        report("resample", 1.0)
        from .metrics import foundation_student_dice

        provenance = self.provenance()
        region = hull(masks.box, roi)  # masks and classes are empty outside it
        provenance["foundation_student_dice"] = foundation_student_dice(masks.crop(region), classes[region], prompts,
                                                                        first_slice=region[2].start)
        if self.planes != ("axial",):
            provenance["multi_plane"] = {
                "planes": list(self.planes),
                "fusion": ("student input: per structure, the mean of the planes' SDM channels; foundation masks "
                           "(QC, foundation_student_dice): majority vote of the planes" if multi else "one plane"),
                "prompt_source": plane_note,
                "foundation_s": {p: round(v["seconds"], 3) for p, v in plane_timings.items()},
                "slices": {p: v["slices"] for p, v in plane_timings.items()},
                # the axial prompts are prompts.json; the others are internal (not editable)
                "prompts": {p: ps.to_dict() for p, ps in plane_prompts.items() if p != "axial"},
            }
        return SegmentResult(volume=volume, labels=labels.astype(np.int16, copy=False), grid=grid, image01=image01,
                             classes=classes, coarse=coarse, masks=masks, prompts=prompts, timings=timings,
                             provenance=provenance, missing=missing, plane_masks=stacked if multi else None,
                             plane_prompts=plane_prompts, uncertainty=uncertainty,
                             probabilities=crop_probs if keep_probabilities else None, roi=roi)

    def _uncertainty(self, student, inputs, probs, crop_classes, missing_idx, grid, offsets, mode) -> dict:
        """The volume-uncertainty record (:mod:`basalseg.uncertainty`) from the student's
        probabilities on its crop; ``"flip"`` also runs one mirrored student pass (and, with the
        left-right TTA on, one unmirrored pass: the diagnostic always compares two single passes,
        whatever the output is made of)."""
        voxel_ml = float(abs(np.linalg.det(grid.affine[:3, :3]))) / 1000.0
        raw = softmax_measures(probs, crop_classes, missing_idx, voxel_ml=voxel_ml)
        if mode == "flip":
            flip_classes = flip_probabilities(student, inputs, self.device, logit_offsets=offsets).argmax(0)
            plain_classes = crop_classes
            if self.config.mirror_tta:
                plain_classes = predict_student(student, inputs, self.device, logit_offsets=offsets)
            for c in missing_idx:
                flip_classes[flip_classes == c] = 0
                plain_classes[plain_classes == c] = 0
            for c, entry in raw.items():
                v_flip = int(np.count_nonzero(flip_classes == c)) * voxel_ml
                v_plain = int(np.count_nonzero(plain_classes == c)) * voxel_ml
                entry["flip_ml"] = v_flip
                entry["flip_half_diff_ml"] = 0.5 * abs(v_flip - v_plain)
        names = {s.class_index: s.name for s in STRUCTURES}
        return {"mode": mode, "measures": {names[c]: v for c, v in raw.items()}}

    def _plane_prompts(self, prompts: PromptSet, coarse: np.ndarray | None, image01: np.ndarray
                       ) -> tuple[dict[str, PromptSet], str]:
        """The prompts of every plane in ``config.planes`` (:func:`basalseg.prompts.plane_prompt_sets`,
        the training cache's derivation), and a note on where they come from.

        Axial: ``prompts`` (generated or given). Coronal/sagittal: drawn from the prompt
        generator's labelmap ``coarse`` along that axis (the prompter is run here when the prompts
        were given), keeping only the structures the axial prompts have.
        """
        others = [p for p in self.planes if p != "axial"]
        if not others:
            return {"axial": prompts}, "axial prompts only"
        if coarse is None:
            log.warning("multi-plane fusion with given prompts: they are used on the axial slices; the %s "
                        "prompts come from the prompt generator (edits apply to the axial plane only)",
                        " and ".join(others))
            coarse = predict_coarse(self.prompter, image01, self.device)
            note = ("given prompts on the axial plane; coronal/sagittal prompts from the prompt generator's labelmap "
                    "(edits apply to the axial plane only; structures absent from the given prompts left out)")
        else:
            note = "all planes from the prompt generator's labelmap"
        return plane_prompt_sets(prompts, coarse, self.planes, min_pixels=self.config.min_prompt_pixels), note

    def provenance(self) -> dict:
        import monai

        backend = self._backend.describe() if self._backend is not None else {"backend": self.config.foundation}
        return {
            "basalseg": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "monai": monai.__version__,
            "numpy": np.__version__,
            "device": str(self.device),
            "foundation": backend,
            "weights": self.weights_info,
            "options": {"band": self.student_mode()[1], "student_input": self.student_mode()[0], "crop": self.config.crop,
                        "min_prompt_pixels": self.config.min_prompt_pixels, "stride": self.config.stride,
                        "context": bool(self.config.context), "planes": list(self.planes),
                        "calibration": _list_or_none(self.student_offsets() if self._student is not None else None),
                        "localise": self.config.localise, "localise_transform": self.config.localise_transform,
                        "mirror_tta": bool(self.config.mirror_tta)},
        }


def _to_input_ml(uncertainty: dict | None, loc) -> None:
    """The uncertainty measures of a localised run in the input's millilitres (in place): they were
    counted on the template grid, whose voxel holds ``|det A|`` mm^3 of the input (``A`` the linear
    part of ``loc.template_to_input``; 1 for a rigid transform, the brain's volume ratio to the
    template's for an affine one), while ``volume_ml`` is counted on the input grid. Records the
    factor as ``ml_per_template_ml``; the ``voxels`` stay template-grid counts."""
    if not uncertainty or not uncertainty.get("measures"):
        return
    scale = abs(float(np.linalg.det(np.asarray(loc.template_to_input, np.float64)[:3, :3])))
    for entry in uncertainty["measures"].values():
        for key, value in list(entry.items()):
            if key.endswith("_ml") and isinstance(value, (int, float)):
                entry[key] = float(value) * scale
    uncertainty["ml_per_template_ml"] = round(scale, 6)


def _prompt_localisation(loc) -> dict:
    """What a localised image's prompts record of the localisation (``PromptSet.template_to_input``)."""
    return {k: v for k, v in loc.to_dict().items() if k in ("applied", "template_to_input", "rotation_deg", "reason", "transform")}


class _Stages:
    """The bookkeeping around :meth:`Pipeline.segment_as_given`'s stages: seconds per stage
    (``timings``), the progress callback (``report(stage, fraction)``) and the cancel check
    (``stop()``)."""

    def __init__(self, progress: ProgressFn | None, should_stop: Callable[[], bool] | None):
        self.report: ProgressFn = progress or (lambda stage, fraction: None)
        self.stop: Callable[[], bool] = should_stop or (lambda: False)
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, key: str):
        """Record the seconds the block takes as ``timings[key]`` (when it does not raise)."""
        t = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - t

    @contextlib.contextmanager
    def stage(self, name: str, *, begin: bool = False, end: bool = True):
        """One stage: raise :class:`Cancelled` when ``stop()`` says so, report ``(name, 0.0)`` when
        ``begin``, time the block as ``timings[name]``, report ``(name, 1.0)`` when ``end``."""
        if self.stop():
            raise Cancelled(f"cancelled before the {name} stage")
        if begin:
            self.report(name, 0.0)
        with self.timed(name):
            yield
        if end:
            self.report(name, 1.0)


def _list_or_none(offsets: np.ndarray | None) -> list[float] | None:
    return None if offsets is None else [round(float(v), 4) for v in offsets]


def _given_region(prompts: PromptSet) -> tuple[slice, ...] | None:
    """For given prompts, the region that sets the student's crop with their masks: the prompter's
    region of the run that wrote them (``source["prompter_region"]``, :meth:`Pipeline.generate_prompts`)
    when it is recorded, on their grid; else (prompts written by hand or by an older version) the
    box around every prompt."""
    recorded = prompts.source.get("prompter_region") if isinstance(prompts.source, dict) else None
    shape = prompts.grid.shape
    if isinstance(recorded, list) and len(recorded) == 3 and all(isinstance(r, list) and len(r) == 2 for r in recorded):
        try:
            return tuple(slice(max(int(a), 0), min(int(b), n)) for (a, b), n in zip(recorded, shape))
        except (TypeError, ValueError):
            pass
    if not prompts.prompts:
        return None
    x0 = min(int(round(p.box[0])) for p in prompts.prompts)
    y0 = min(int(round(p.box[1])) for p in prompts.prompts)
    x1 = max(int(round(p.box[2])) for p in prompts.prompts) + 1
    y1 = max(int(round(p.box[3])) for p in prompts.prompts) + 1
    z0, z1 = min(p.slice for p in prompts.prompts), max(p.slice for p in prompts.prompts) + 1
    return tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip((x0, y0, z0), (x1, y1, z1), shape))
