"""Brain-localisation robustness on fresh synthetic heads: the current ``localise`` against
another version of ``basalseg/localise.py`` (issue 11).

    git show bed3f37:BasalSegSAM/basalseg/localise.py > /tmp/localise_old.py
    PYTHONPATH=BasalSegSAM OMP_NUM_THREADS=1 .venv/bin/python scripts/registration_robustness.py \
        --seed 5001 --n 16 --other /tmp/localise_old.py

Head ``i`` is ``synthesize_head`` of ``subject_seed(seed, i)`` with the default ``HeadConfig``
(MNI152 and ICBM 2009c alternating, template and T1-like GMM contrast in pairs). Each is
localised like a training case (``basalseg.data.localised.localise_case``) once per version;
a JSON line per head gives ``[label_overlap, ncc]`` (or ``FAIL`` and the error) and seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "BasalSegSAM"))

import basalseg.localise as L  # noqa: E402
from basalseg.data.generate import load_sources  # noqa: E402
from basalseg.data.head import HeadConfig, brain_config_for_heads, synthesize_head  # noqa: E402
from basalseg.data.localised import localise_case  # noqa: E402
from basalseg.data.synth import SynthConfig, subject_seed  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--other", type=Path, default=None, help="another localise.py to compare with")
    args = p.parse_args(argv)
    versions = [("current", L.localise)]
    if args.other:
        spec = importlib.util.spec_from_file_location("basalseg.localise_other", args.other)
        other = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = other
        spec.loader.exec_module(other)
        if not hasattr(other.Localisation, "search"):  # a version before the second search
            other.Localisation.search = None
        versions.insert(0, ("other", other.localise))
    current = L.localise
    sources = load_sources(("mni152", "icbm2009c"), "dk", brain_config_for_heads(SynthConfig()))
    failures = {name: 0 for name, _ in versions}
    for i in range(args.n):
        cfg = SynthConfig(contrast=("template", "t1_gmm")[(i // 2) % 2])
        head = synthesize_head(sources[i % 2][0], subject_seed(args.seed, i), cfg, HeadConfig())
        row = {"i": i, "axcodes": head.params["head"]["axcodes"], "rotation_deg": head.params["head"]["rotation_deg"]}
        for name, fn in versions:
            L.localise = fn  # localise_case() looks the function up at call time
            t = time.perf_counter()
            try:
                _, _, rec = localise_case(head.image, head.labels)
                row[name] = [rec["label_overlap"], rec["ncc"]]
            except Exception as exc:  # noqa: BLE001 - a refused head is the figure
                row[name] = ["FAIL", str(exc)[:80]]
                failures[name] += 1
            row[f"{name}_s"] = round(time.perf_counter() - t, 1)
        L.localise = current
        print(json.dumps(row), flush=True)
    print(json.dumps({"heads": args.n, "refused": failures}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
