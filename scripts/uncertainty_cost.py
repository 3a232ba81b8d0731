"""Cost of the volume uncertainty, measured in one process (docs/UNCERTAINTY.md).

    python scripts/uncertainty_cost.py [IMAGE] --threads 2 --repeats 2 [--json OUT.json]

Runs ``Pipeline.segment`` on IMAGE (default: the bundled MNI152 T1) once with
``uncertainty="none"`` (the full run: its total is the whole segment time), then, with the
foundation masks of that run reused from a cache (so only prompter, SDM, student and the
uncertainty stage run again), alternately with ``none``, ``softmax`` (the default) and ``flip``,
``--repeats`` times each. Reports per mode the best time of student + uncertainty stages and of
the whole (cached) segment call, and the added seconds against ``none``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "BasalSegSAM"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", nargs="?", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from basalseg.data.atlas import sample_t1_path
    from basalseg.foundation import SliceMaskCache
    from basalseg.imageio import load_volume
    from basalseg.pipeline import Pipeline, PipelineConfig

    image = args.image or sample_t1_path()
    volume = load_volume(image)
    pipes = {m: Pipeline(PipelineConfig(threads=args.threads, uncertainty=m)) for m in ("none", "softmax", "flip")}
    cache = SliceMaskCache()
    t = time.perf_counter()
    first = pipes["none"].segment(volume, cache=cache)
    full = time.perf_counter() - t
    for m in ("softmax", "flip"):  # share the loaded networks and backend
        pipes[m] = pipes["none"].with_config(pipes[m].config)
    best: dict[str, dict] = {m: {"student_s": float("inf"), "uncertainty_s": float("inf"), "segment_cached_s": float("inf")}
                             for m in pipes}
    for _ in range(args.repeats):
        for m, pipe in pipes.items():
            t = time.perf_counter()
            r = pipe.segment(volume, cache=cache)
            wall = time.perf_counter() - t
            b = best[m]
            b["student_s"] = min(b["student_s"], r.timings["student"])
            b["uncertainty_s"] = min(b["uncertainty_s"], r.timings.get("uncertainty", 0.0))
            b["segment_cached_s"] = min(b["segment_cached_s"], wall)
            assert (r.labels == first.labels).all(), "the labelmap must not depend on the uncertainty mode"
    base = best["none"]["student_s"] + best["none"]["uncertainty_s"]
    out = {"image": str(image), "threads": args.threads, "repeats": args.repeats,
           "full_segment_s (none, first run)": round(full, 2), "modes": {}}
    for m, b in best.items():
        out["modes"][m] = {k: round(v, 3) for k, v in b.items()}
        out["modes"][m]["added_s"] = round(b["student_s"] + b["uncertainty_s"] - base, 3)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
