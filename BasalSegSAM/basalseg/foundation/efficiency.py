"""How close the foundation encoder runs to what the machine can do (used by ``basalseg bench``).

* :func:`encoder_flops`: the floating-point operations of one encoder pass, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on the plain module (matrix products and
  convolutions, 2 per multiply-add; element-wise work is not counted). The optimised encoders do
  the same arithmetic through other kernels (oneDNN fused ops, which the counter does not see),
  so the plain module's count is the count of every implementation.
* :func:`gemm_gflops`: the machine's own float32 matrix-product throughput, a square ``n x n``
  product on torch's current threads, measured in the calling process (so on the same threads
  and under the same load as the encoder it is compared with).
* :func:`profile_encoder`: the encoder's time per operator (``torch.profiler``), for
  ``basalseg bench --profile``.
"""

from __future__ import annotations

import time

import torch

__all__ = ["encoder_flops", "gemm_gflops", "profile_encoder"]


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


def gemm_gflops(n: int = 2048, repeats: int = 5, device="cpu") -> dict:
    """Float32 ``n x n`` by ``n x n`` matrix product on torch's current threads: GFLOP/s of the
    best and the median of ``repeats`` timed products (after one untimed one)."""
    dev = torch.device(device)
    a = torch.rand(n, n, device=dev)
    b = torch.rand(n, n, device=dev)
    out = torch.empty(n, n, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(max(int(repeats), 1)):
        sync()
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        times.append(time.perf_counter() - t)
    flops = 2.0 * n**3
    times.sort()
    return {"n": n, "threads": torch.get_num_threads(), "best_gflops": flops / times[0] / 1e9,
            "median_gflops": flops / times[len(times) // 2] / 1e9}


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
