"""``basalseg prompts T1 --out DIR``: stage 2 only, the per-slice prompts to inspect or edit."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_run_options, pipeline_config, progress_mode
from .segment import check_out

__all__ = ["register", "run"]


def register(sub) -> None:
    p = sub.add_parser("prompts", help="generate the per-slice prompts only (for inspection or editing)")
    p.add_argument("image", type=Path)
    add_run_options(p, with_student=False)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..imageio import load_volume
    from ..progress import emit_json
    from ..results import write_prompts_only

    check_out(args)
    volume = load_volume(args.image)
    from ..pipeline import Pipeline  # torch and MONAI only once the input has been read (as segment)

    pipeline = Pipeline(pipeline_config(args))
    prompts, coarse, image01, _, loc = pipeline.prompts_for(volume)
    provenance = {k: v for k, v in pipeline.provenance().items() if k not in ("foundation", "options")}
    provenance["localisation"] = loc.to_dict()
    provenance["options"] = {"min_prompt_pixels": pipeline.config.min_prompt_pixels}
    write_prompts_only(prompts, image01, coarse, volume, args.out, overwrite=args.overwrite, provenance=provenance)
    if progress_mode(args.progress) == "json":
        emit_json(event="done", out=str(args.out))
    else:
        print(f"wrote {args.out}/prompts.json: {len(prompts.prompts)} prompts on {len(prompts.slices())} slices "
              f"for {len(prompts.structures_found())} structures")
        if loc.applied:
            print(f"  localised: {loc.reason}; the prompts are on the brain template's grid (source.localisation "
                  "in prompts.json); segment --prompts uses the same transform")
    return 0
