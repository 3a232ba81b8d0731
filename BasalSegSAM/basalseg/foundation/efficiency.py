"""How close the foundation encoder runs to what the machine can do (used by ``basalseg bench``).

* :func:`encoder_flops`: the floating-point operations of one encoder pass, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on the plain module (matrix products and
  convolutions, 2 per multiply-add; element-wise work is not counted). The optimised encoders do
  the same arithmetic through other kernels (oneDNN fused ops, which the counter does not see),
  so the plain module's count is the count of every implementation.
* :func:`gemm_gflops`: the machine's own float32 matrix-product throughput, a square ``n x n``
  product on torch's current threads, measured in the calling process (so on the same threads
  and under the same load as the encoder it is compared with), through ``torch.mm`` (MKL or
  OpenBLAS) or through oneDNN's linear kernel (the one the fused CPU encoder runs on).
  :func:`machine_gemm` measures both and keeps the faster: on an AMD EPYC (2 vCPUs, 2026-12-03)
  ``torch.mm`` reached 190-209 GFLOP/s and oneDNN 440-460, so a ratio against ``torch.mm`` alone
  overstated the encoder's efficiency (it read 113 %).
* :func:`profile_encoder`: the encoder's time per operator (``torch.profiler``), for
  ``basalseg bench --profile``.
"""

from __future__ import annotations

import time

import torch

__all__ = ["encoder_flops", "gemm_gflops", "machine_gemm", "profile_encoder", "GEMM_KERNELS"]

#: the GEMM kernels :func:`gemm_gflops` can time
GEMM_KERNELS = ("torch.mm", "oneDNN")


def encoder_flops(encoder: torch.nn.Module, size: int = 256, batch: int = 1, device="cpu") -> dict:
    """``{"total": FLOPs of one pass of ``batch`` images, "per_op": {op: FLOPs}}`` for a
    ``(batch, 3, size, size)`` input."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        encoder(x)
    per_op = {str(k).replace("aten.", ""): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return {"total": int(counter.get_total_flops()), "per_op": per_op}


def gemm_gflops(n: int = 2048, repeats: int = 5, device="cpu", kernel: str = "torch.mm") -> dict:
    """Float32 ``n x n`` by ``n x n`` matrix product on torch's current threads: GFLOP/s of the
    best and the median of ``repeats`` timed products (after one untimed one).

    ``kernel``: ``"torch.mm"``, or ``"oneDNN"`` (``torch.ops.mkldnn._linear_pointwise``, CPU
    only; ValueError where this torch or device lacks it)."""
    if kernel not in GEMM_KERNELS:
        raise ValueError(f"kernel must be one of {GEMM_KERNELS}; got {kernel!r}")
    dev = torch.device(device)
    a = torch.rand(n, n, device=dev)
    b = torch.rand(n, n, device=dev)
    if kernel == "oneDNN":
        from .litemedsam_encoder import _mkldnn_fusion_available

        if dev.type != "cpu" or not _mkldnn_fusion_available():
            raise ValueError("the oneDNN GEMM needs a CPU torch with oneDNN's fused linear kernels")

        def product():
            return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")  # a @ b.T
    else:
        out = torch.empty(n, n, device=dev)

        def product():
            return torch.mm(a, b, out=out)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        product()
        for _ in range(max(int(repeats), 1)):
            sync()
            t = time.perf_counter()
            product()
            sync()
            times.append(time.perf_counter() - t)
    flops = 2.0 * n**3
    times.sort()
    return {"n": n, "threads": torch.get_num_threads(), "kernel": kernel, "best_gflops": flops / times[0] / 1e9,
            "median_gflops": flops / times[len(times) // 2] / 1e9}


def machine_gemm(n: int = 2048, repeats: int = 5, device="cpu") -> dict:
    """:func:`gemm_gflops` through every kernel this torch and device have; the fastest one's
    figures, with ``"kernels": {kernel: best GFLOP/s}`` for all of them."""
    results = []
    for kernel in GEMM_KERNELS:
        try:
            results.append(gemm_gflops(n, repeats, device, kernel))
        except ValueError:
            continue
    best = max(results, key=lambda r: r["best_gflops"])
    return {**best, "kernels": {r["kernel"]: r["best_gflops"] for r in results}}


def profile_encoder(encode, x: torch.Tensor, passes: int = 2, rows: int = 15) -> dict:
    """``torch.profiler`` of ``passes`` calls ``encode(x)`` (after one untimed call): the ``rows``
    operators with the most self CPU time, as ``{"ops": [(name, self_ms_per_pass, share, calls_per_pass)], "table": str}``."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        encode(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(passes):
                encode(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ops = [(e.key, e.self_cpu_time_total / 1000.0 / passes, e.self_cpu_time_total / total, e.count // passes)
           for e in events[:rows]]
    return {"ops": ops, "self_ms_per_pass": total / 1000.0 / passes,
            "table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)}
