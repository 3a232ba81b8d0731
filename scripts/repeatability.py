"""Scan-rescan repeatability and interval coverage on synthetic rescans (docs/UNCERTAINTY.md).

    python scripts/repeatability.py run --cohort runs/cohorts/rescan_val_903 ... --work runs/rep --threads 1
    python scripts/repeatability.py analyse --work runs/rep --fit rescan_val_903 \
        --report rescan_heldout_mni_901 --report rescan_heldout_icbm_902 --table OUT.json --markdown OUT.md
    python scripts/repeatability.py run --cohort runs/cohorts/rescan_head_921 --work runs/rephead --localise auto
    python scripts/repeatability.py analyse-localised --work runs/rephead --report rescan_head_921 --into OUT.json

``run`` segments every case of the cohorts (``basalseg synth --rescans K``) with the shipped
defaults plus the ``flip`` diagnostic, one pipeline for all, and writes one small JSON per case
under ``WORK/cases/`` (resumable: finished cases are skipped). Cases run subject by subject,
alternating between the cohorts, so a partial run has every cohort represented.

``analyse-localised`` measures the repeatability of localised results (whole-head rescans, ``basalseg
synth --head --rescans K``, segmented with ``run --localise auto``) and adds it to a table as its
``localised`` part (what ``compare`` uses when both results were localised).

``analyse`` fits the interval factors on the ``--fit`` cohorts only, and reports repeatability
(within-subject CV, SDC) and coverage on the ``--report`` cohorts (and, for reference, the
coverage on the fit cohorts themselves, marked as such).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "BasalSegSAM"))

from basalseg.structures import STRUCTURES  # noqa: E402

NAMES = [s.name for s in STRUCTURES]


def _cases(cohort: Path) -> list[dict]:
    meta = json.loads((cohort / "dataset.json").read_text())
    out = []
    for rec in meta["basalseg_synth"]["cases"]:
        out.append({"cohort": cohort.name, "name": rec["name"], "subject": rec.get("subject", rec["name"]),
                    "rescan": rec.get("rescan", 0), "image": cohort / "imagesTr" / f"{rec['name']}_0000.nii.gz",
                    "label": cohort / "labelsTr" / f"{rec['name']}.nii.gz"})
    return out


def _order(cohorts: list[list[dict]]) -> list[dict]:
    """Subject by subject, alternating cohorts, first the subject scan and its first rescan of
    every subject, then the further rescans (a partial run has as many subjects as it can)."""
    per = []
    for cases in cohorts:
        subjects: dict[str, list[dict]] = {}
        for c in cases:
            subjects.setdefault(c["subject"], []).append(c)
        per.append(list(subjects.values()))
    out = []
    for i in range(max(len(p) for p in per)):
        for p in per:
            if i < len(p):
                out.extend(sorted(p[i], key=lambda c: c["rescan"]))
    return sorted(out, key=lambda c: c["rescan"] > 1)  # stable: the order above within each part


def cmd_run(args) -> int:
    import nibabel as nib

    from basalseg.imageio import load_volume
    from basalseg.outputs import volume_rows
    from basalseg.pipeline import Pipeline, PipelineConfig

    work = Path(args.work)
    (work / "cases").mkdir(parents=True, exist_ok=True)
    cases = _order([_cases(Path(c)) for c in args.cohort])
    pipeline = Pipeline(PipelineConfig(threads=args.threads, uncertainty=args.mode, localise=args.localise))
    import os

    for n, case in list(enumerate(cases))[args.start:]:
        out = work / "cases" / f"{case['name']}.json"
        claim = out.with_suffix(".claim")  # a second worker (--start) skips what another one is doing
        if out.exists():
            continue
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        t = time.perf_counter()
        volume = load_volume(case["image"])
        result = pipeline.segment(volume)
        ref = np.asarray(nib.load(str(case["label"])).dataobj).astype(np.int16)
        rows = volume_rows(result.labels, volume.voxel_volume_mm3)
        ref_rows = volume_rows(ref, volume.voxel_volume_mm3)
        dice = {}
        for s in STRUCTURES:
            a, b = result.labels == s.label, ref == s.label
            dice[s.name] = round(2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0), 4)
        record = {"cohort": case["cohort"], "name": case["name"], "subject": case["subject"], "rescan": case["rescan"],
                  "volume_ml": {r["structure"]: r["volume_ml"] for r in rows},
                  "reference_ml": {r["structure"]: r["volume_ml"] for r in ref_rows}, "dice": dice,
                  "measures": result.uncertainty["measures"], "timings": {k: round(v, 3) for k, v in result.timings.items()},
                  "missing": result.missing, "options": pipeline.provenance()["options"],
                  "localisation": result.provenance.get("localisation"),
                  "student_sha256": pipeline.weights_info.get("student", {}).get("sha256")}
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(out)
        claim.unlink(missing_ok=True)
        print(f"[{n + 1}/{len(cases)}] {case['name']}: {time.perf_counter() - t:.1f} s "
              f"(uncertainty {result.timings.get('uncertainty', 0):.2f} s)", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------------------------

Z = 1.959963984540054


def _load(work: Path, cohorts: list[str]) -> list[dict]:
    recs = [json.loads(p.read_text()) for p in sorted((work / "cases").glob("*.json"))]
    return [r for r in recs if r["cohort"] in cohorts]


def _scale(rec: dict, name: str, kind: str) -> float:
    m = rec["measures"][name]
    if kind == "band":
        return m["band_ml"]
    if kind == "pb":
        return m["pb_sd_ml"]
    if kind == "flip":
        return m.get("flip_half_diff_ml", float("nan"))
    raise ValueError(kind)


def _fit_k(recs: list[dict], name, kind: str, level: float = 0.95) -> float:
    """Smallest k with a fraction >= level of |V - V_ref| <= Z k scale (``name``: a structure, or
    a list of structures pooled)."""
    ratios = []
    for n in ([name] if isinstance(name, str) else name):
        for r in recs:
            s = _scale(r, n, kind)
            err = abs(r["volume_ml"][n] - r["reference_ml"][n])
            ratios.append(math.inf if s <= 0 else err / (Z * s))
    ratios = np.sort(np.array(ratios))
    idx = min(int(math.ceil(level * len(ratios))) - 1, len(ratios) - 1)
    return float(ratios[idx])


def _coverage(recs: list[dict], name: str, kind: str, k: float) -> float:
    hits = [abs(r["volume_ml"][name] - r["reference_ml"][name]) <= Z * k * _scale(r, name, kind) for r in recs]
    return float(np.mean(hits)) if hits else float("nan")


def _width(recs: list[dict], name: str, kind: str, k: float) -> float:
    """Mean half-width relative to the volume, percent."""
    return float(np.mean([100 * Z * k * _scale(r, name, kind) / max(r["volume_ml"][name], 1e-9) for r in recs]))


def _repeatability(recs: list[dict], name: str) -> dict:
    """Within-subject SD (pooled over subjects, ddof 1 per subject), its CV, SDC; and the same for
    the reference volumes (label resampling in the new pose)."""
    subjects: dict[str, list[dict]] = {}
    for r in recs:
        subjects.setdefault((r["cohort"], r["subject"]), []).append(r)
    ss = ss_rel = ss_ref = 0.0
    dof = 0
    means, bands = [], []
    for group in subjects.values():
        if len(group) < 2:
            continue
        v = np.array([g["volume_ml"][name] for g in group])
        ref = np.array([g["reference_ml"][name] for g in group])
        ss += float(((v - v.mean()) ** 2).sum())
        ss_rel += float((((v - v.mean()) / v.mean()) ** 2).sum())
        ss_ref += float((((ref - ref.mean()) / ref.mean()) ** 2).sum())
        dof += len(group) - 1
        means.append(v.mean())
        bands += [g["measures"][name]["band_ml"] for g in group]
    if dof == 0:
        return {}
    sd = math.sqrt(ss / dof)
    cv = math.sqrt(ss_rel / dof)
    return {"n_subjects": sum(1 for g in subjects.values() if len(g) >= 2), "n_scans": sum(len(g) for g in subjects.values() if len(g) >= 2),
            "dof": dof, "sd_within_ml": sd, "cv_within": cv, "sdc_ml": Z * math.sqrt(2) * sd,
            "sdc_percent": 100 * Z * math.sqrt(2) * cv, "mean_ml": float(np.mean(means)),
            "reference_cv_within": math.sqrt(ss_ref / dof),
            "mean_band_ml": float(np.mean(bands)), "band_ratio": sd / max(float(np.mean(bands)), 1e-12)}


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def cmd_analyse(args) -> int:
    work = Path(args.work)
    fit = _load(work, args.fit)
    groups = {c: _load(work, [c]) for c in args.report}
    kinds = ["band", "pb", "flip"]
    if not fit:
        raise SystemExit("no fit cases")
    per_structure = {kind: {n: _fit_k(fit, n, kind) for n in NAMES} for kind in kinds}
    pooled = {kind: _fit_k(fit, NAMES, kind) for kind in kinds}
    # one k for all structures: the fit set is small (a per-structure k from a handful of scans
    # is the largest ratio seen, not a 95th percentile); per-structure k shown for comparison
    ks = {kind: {n: pooled[kind] for n in NAMES} for kind in kinds}
    lines = []
    say = lines.append
    say(f"fit cohorts: {', '.join(args.fit)} ({len(fit)} scans of {len({(r['cohort'], r['subject']) for r in fit})} subjects)")
    for c, recs in groups.items():
        say(f"report cohort: {c} ({len(recs)} scans of {len({r['subject'] for r in recs})} subjects)")
    say("")
    # 1. interval scales compared: per kind, k per structure, coverage and width on the report cohorts
    say("| interval scale | cohort | mean coverage (95 % nominal) | min over structures | mean half-width % |")
    say("|---|---|---:|---:|---:|")
    for kind in kinds:
        for c, recs in [("fit (in-sample): " + "+".join(args.fit), fit)] + list(groups.items()):
            if not recs or (kind == "flip" and "flip_ml" not in recs[0]["measures"][NAMES[0]]):
                continue
            cov = [_coverage(recs, n, kind, ks[kind][n]) for n in NAMES]
            wid = [_width(recs, n, kind, ks[kind][n]) for n in NAMES]
            say(f"| {kind} | {c} | {np.mean(cov):.3f} | {np.min(cov):.3f} | {np.mean(wid):.1f} |")
    say("")
    say("For comparison, a k fitted per structure (band):")
    say("")
    say("| cohort | mean coverage | min over structures |")
    say("|---|---:|---:|")
    for c, recs in groups.items():
        if recs:
            cov = [_coverage(recs, n, "band", per_structure["band"][n]) for n in NAMES]
            say(f"| {c} | {np.mean(cov):.3f} | {np.min(cov):.3f} |")
    say("")
    say("pooled k: " + ", ".join(f"{kind} {pooled[kind]:.3f}" for kind in kinds))
    say("")
    # uncalibrated coverage (k = 1)
    say("| scale, k = 1 (uncalibrated) | cohort | mean coverage |")
    say("|---|---|---:|")
    for kind in kinds:
        for c, recs in groups.items():
            if recs and (kind != "flip" or "flip_ml" in recs[0]["measures"][NAMES[0]]):
                say(f"| {kind} | {c} | {np.mean([_coverage(recs, n, kind, 1.0) for n in NAMES]):.3f} |")
    say("")
    # 2. does the scale track the error? Spearman of |error| vs scale, pooled over structures (relative)
    say("| scale | cohort | Spearman(|error| %, scale %) | Spearman(rescan |V - subject mean| %, scale %) |")
    say("|---|---|---:|---:|")
    for kind in kinds:
        for c, recs in list(groups.items()):
            if not recs or (kind == "flip" and "flip_ml" not in recs[0]["measures"][NAMES[0]]):
                continue
            err, dev, sc = [], [], []
            subj_mean = {}
            for r in recs:
                for n in NAMES:
                    subj_mean.setdefault((r["subject"], n), []).append(r["volume_ml"][n])
            for r in recs:
                for n in NAMES:
                    v = r["volume_ml"][n]
                    err.append(abs(v - r["reference_ml"][n]) / r["reference_ml"][n])
                    dev.append(abs(v - np.mean(subj_mean[(r["subject"], n)])) / v)
                    sc.append(_scale(r, n, kind) / v)
            say(f"| {kind} | {c} | {_spearman(np.array(err), np.array(sc)):.2f} | {_spearman(np.array(dev), np.array(sc)):.2f} |")
    say("")
    # 3. per structure: chosen interval (band), coverage per report cohort; repeatability
    chosen = "band"
    say(f"Per structure, the shipped interval (scale `{chosen}_ml`, one k = {pooled[chosen]:.3f} fitted on the fit cohorts):")
    say("")
    head = "| structure | k | " + " | ".join(f"coverage {c} | half-width % {c}" for c in groups) + " |"
    say(head)
    say("|---|---:|" + "---:|" * (2 * len(groups)))
    for n in NAMES:
        cells = [f"{ks[chosen][n]:.2f}"]
        for c, recs in groups.items():
            cells += [f"{_coverage(recs, n, chosen, ks[chosen][n]):.2f}", f"{_width(recs, n, chosen, ks[chosen][n]):.1f}"]
        say(f"| {n} | " + " | ".join(cells) + " |")
    say("")
    rep_all = [r for recs in groups.values() for r in recs]
    rep = {n: _repeatability(rep_all, n) for n in NAMES}
    say("Scan-rescan repeatability, report cohorts pooled" + " (" + ", ".join(groups) + "):")
    say("")
    say("| structure | mean mL | within-subject SD mL | CV % | SDC mL | SDC % | reference CV % (label resampling) | "
        + " | ".join(f"CV % {c}" for c in groups) + " |")
    say("|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(groups))
    for n in NAMES:
        e = rep[n]
        if not e:
            continue
        per = [_repeatability(recs, n) for recs in groups.values()]
        say(f"| {n} | {e['mean_ml']:.3f} | {e['sd_within_ml']:.4f} | {100 * e['cv_within']:.2f} | {e['sdc_ml']:.3f} | "
            f"{e['sdc_percent']:.1f} | {100 * e['reference_cv_within']:.2f} | "
            + " | ".join(f"{100 * p['cv_within']:.2f}" if p else "" for p in per) + " |")
    say("")
    # Dice, volume error for context
    say("| cohort | mean Dice | mean signed volume error % |")
    say("|---|---:|---:|")
    for c, recs in [("+".join(args.fit), fit)] + list(groups.items()):
        if recs:
            d = np.mean([r["dice"][n] for r in recs for n in NAMES])
            e = np.mean([r["volume_ml"][n] / r["reference_ml"][n] - 1 for r in recs for n in NAMES])
            say(f"| {c} | {d:.3f} | {100 * e:+.1f} |")
    say("")
    t_u = [r["timings"].get("uncertainty", 0) for r in fit + rep_all]
    say(f"uncertainty stage (softmax measures + flip pass) per scan: mean {np.mean(t_u):.2f} s")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.table:
        sample = (fit + rep_all)[0]
        options, kind = _effective(fit + rep_all)
        table = {
            "format": "basalseg-repeatability", "version": 1, "date": datetime.date.today().isoformat(),
            "student_sha256": sample.get("student_sha256"), "options": options,
            **({"input": kind} if kind else {}),
            "interval": {"scale": "band_ml", "z": Z, "level": 0.95, "fitted_on": args.fit,
                         "method": "one k for all structures: the smallest k with 95 % of |volume - reference| <= z k band_ml "
                                   "over the fit cohorts' scans and structures",
                         "n_fit_scans": len(fit), "k": {n: round(ks[chosen][n], 4) for n in NAMES},
                         "k_per_structure_for_reference": {n: round(per_structure[chosen][n], 4) for n in NAMES}},
            "repeatability": {n: {k2: (round(v, 6) if isinstance(v, float) else v) for k2, v in rep[n].items()} for n in NAMES},
            "repeatability_cohorts": list(groups),
            "definitions": {"cv_within": "sqrt(pooled within-subject variance of volume / subject mean volume), dof = scans - subjects",
                            "sdc": "1.96 * sqrt(2) * within-subject SD (the 95 % limit of a rescan difference)"},
            "made_by": "scripts/repeatability.py analyse " + " ".join(sys.argv[2:]),
        }
        Path(args.table).write_text(json.dumps(table, indent=1) + "\n")
    return 0


def _effective(recs: list) -> tuple[dict, str | None]:
    """The study's options as they acted (basalseg.longitudinal.effective_options: ``localise`` ``on``
    when every scan was localised, ``off`` when none was) and, for a localised study, the kind of
    input every scan was (basalseg.longitudinal's head-tissue rule; a scan that records no measure
    counts as skull-stripped); exits when the scans went different ways or were of both kinds."""
    from types import SimpleNamespace

    from basalseg.longitudinal import _input_kind, effective_options

    provenances = [{"options": r.get("options") or {}, "localisation": r.get("localisation") or {}} for r in recs]
    effective = [effective_options(p) for p in provenances]
    ways = {o.get("localise") == "on" for o in effective}
    if len(ways) > 1:
        raise SystemExit("some scans were localised and some were not: a study measures one way")
    options = effective[0]
    if ways != {True}:
        return options, None
    kinds = {_input_kind(SimpleNamespace(provenance=p)) or "skull-stripped" for p in provenances}
    if len(kinds) > 1:
        raise SystemExit("the scans are whole heads and skull-stripped brains: a study measures one kind")
    return options, kinds.pop()


def cmd_analyse_localised(args) -> int:
    """The scan-rescan repeatability of localised results (whole-head rescans segmented with
    ``run --localise auto``), added to an existing table as its ``"localised"`` part: what
    ``compare`` uses for two localised results (basalseg.longitudinal.table_for). The volume
    interval's k stays the one fitted on skull-stripped scans; its coverage on these rescans is
    reported (and recorded), not refitted."""
    work = Path(args.work)
    recs = _load(work, args.report)
    if not recs:
        raise SystemExit("no cases of the --report cohorts in " + str(work / "cases"))
    options, kind = _effective(recs)  # one way and one kind of input, by basalseg.longitudinal's rules
    if kind is None:
        raise SystemExit("the scans were not localised (run --localise auto on whole heads)")
    if kind != "whole head":
        raise SystemExit("the scans have no head around the brain (the localisation's head-tissue check): "
                         "this study is of whole heads")
    table_path = Path(args.into)
    table = json.loads(table_path.read_text())
    sha = {r.get("student_sha256") for r in recs}
    if sha != {table.get("student_sha256")}:
        raise SystemExit(f"the scans were segmented by another student ({', '.join(map(str, sha))}) than the table's "
                         f"({table.get('student_sha256')})")
    differ = sorted({k for r in recs for k in table.get("options", {})  # every scan's, "localise" by what it did
                     if k != "localise" and r["options"].get(k) != table["options"][k]})
    if differ:
        raise SystemExit(f"the scans were segmented with other options ({', '.join(differ)}) than the table's")
    rep = {n: _repeatability(recs, n) for n in NAMES}
    k = table["interval"]["k"]
    cover = {n: _coverage(recs, n, "band", float(k[n])) for n in NAMES}
    width = {n: _width(recs, n, "band", float(k[n])) for n in NAMES}
    lines = []
    say = lines.append
    subjects = {(r["cohort"], r["subject"]) for r in recs}
    say(f"localised (whole-head) rescans: {', '.join(args.report)} ({len(recs)} scans of {len(subjects)} subjects)")
    say("")
    base = table.get("repeatability") or {}
    say("| structure | mean mL | within-subject SD mL | CV % | SDC mL | SDC % | reference CV % (label resampling) | "
        "SDC % skull-stripped study | interval coverage (k fitted on skull-stripped scans) | half-width % |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in NAMES:
        e = rep[n]
        if not e:
            continue
        old = base.get(n, {}).get("sdc_percent")
        say(f"| {n} | {e['mean_ml']:.3f} | {e['sd_within_ml']:.4f} | {100 * e['cv_within']:.2f} | {e['sdc_ml']:.3f} | "
            f"{e['sdc_percent']:.1f} | {100 * e['reference_cv_within']:.2f} | {'' if old is None else f'{old:.1f}'} | "
            f"{cover[n]:.2f} | {width[n]:.1f} |")
    say("")
    d = np.mean([r["dice"][n] for r in recs for n in NAMES])
    err = np.mean([r["volume_ml"][n] / r["reference_ml"][n] - 1 for r in recs for n in NAMES])
    say(f"mean Dice {d:.3f}, mean signed volume error {100 * err:+.1f} %, interval coverage {np.mean(list(cover.values())):.3f} "
        f"(mean over structures), localisation {np.mean([r['timings'].get('localise', 0) for r in recs]):.1f} s per scan")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    table["localised"] = {
        "date": datetime.date.today().isoformat(), "options": options,
        "protocol": "same",  # every rescan keeps its subject's protocol (basalseg.data.head, rescan=)
        "input": "whole head",  # every scan passed the localisation's head-tissue check (checked above)
        "repeatability": {n: {k2: (round(v, 6) if isinstance(v, float) else v) for k2, v in rep[n].items()} for n in NAMES},
        "repeatability_cohorts": list(args.report),
        "interval_coverage": {n: round(cover[n], 4) for n in NAMES},
        "made_by": "scripts/repeatability.py analyse-localised " + " ".join(sys.argv[2:]),
    }
    out = Path(args.table or args.into)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    tmp.replace(out)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--cohort", action="append", required=True)
    r.add_argument("--work", required=True)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--mode", default="flip", choices=["softmax", "flip"])
    r.add_argument("--start", type=int, default=0, help="begin at this position of the case order (a second worker)")
    r.add_argument("--localise", default="off", choices=["off", "auto", "on"],
                   help="the pipeline's localisation (off: the study of skull-stripped rescans; auto, as the command "
                        "line: the study of whole-head rescans, 'analyse-localised')")
    r.set_defaults(fn=cmd_run)
    a = sub.add_parser("analyse")
    a.add_argument("--work", required=True)
    a.add_argument("--fit", action="append", required=True)
    a.add_argument("--report", action="append", required=True)
    a.add_argument("--table", default=None)
    a.add_argument("--markdown", default=None)
    a.set_defaults(fn=cmd_analyse)
    lo = sub.add_parser("analyse-localised")
    lo.add_argument("--work", required=True)
    lo.add_argument("--report", action="append", required=True)
    lo.add_argument("--into", required=True, help="the table (from 'analyse') to add the localised part to")
    lo.add_argument("--table", default=None, help="write the result here (default: --into itself)")
    lo.add_argument("--markdown", default=None)
    lo.set_defaults(fn=cmd_analyse_localised)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
