"""``basalseg bench --levers``: each speed lever of the foundation stage timed on its own,
interleaved in one process (encoder per slice, decoder per box, best of ``--repeats``), on
DK-prompted slices of the MNI152 template (``benchmarks/README.md``, "Levers").
"""

from __future__ import annotations

import time

from .bench import _machine, dk_prompts, spread_subset

__all__ = ["run_levers", "format_levers"]


# ---------------------------------------------------------------------------------------------
# levers one by one
# ---------------------------------------------------------------------------------------------


def run_levers(n_slices: int = 4, repeats: int = 2, device=None, threads: int | None = None, onnx: bool = True,
               compile_encoder: bool = False, batches=(1, 4)) -> dict:
    """Per-slice encoder and per-box decoder cost of each lever, measured interleaved in one process
    on ``n_slices`` DK-prompted slices of the MNI152 template (wall and CPU time, best of
    ``repeats``). Returns ``{lever: {...}}``."""
    import torch

    from .data.atlas import sample_t1_path
    from .foundation import pick_device
    from .foundation.litemedsam import LiteMedSAMBackend
    from .foundation.litemedsam_fast import FastLiteMedSAMBackend
    from .foundation.runner import prompt_arrays, slice_image, slice_roi
    from .imageio import load_volume
    from .intensity import normalize01
    from .spatial import to_canonical

    if threads:
        torch.set_num_threads(int(threads))
    dev = str(pick_device(device))
    data, grid = to_canonical(load_volume(sample_t1_path()))
    image01 = normalize01(data)
    prompts = spread_subset(dk_prompts(grid)[0], n_slices)
    work = []
    for k in prompts.slices():
        on = prompts.on_slice(k)
        x0, y0, x1, y1 = slice_roi(on, image01.shape[:2], 16)
        boxes, _, _ = prompt_arrays(on, x0, y0)
        work.append((slice_image(image01, k)[y0:y1, x0:x1], boxes, slice_image(image01, k),
                     prompt_arrays(on, 0, 0)[0]))
    n_boxes = sum(len(w[1]) for w in work)
    backends = {"plain": LiteMedSAMBackend(device=dev)}
    variants = {"fused (BN folded)": dict(encoder="fused", band=None, nhwc=False),
                "fused + banded stage 0": dict(encoder="fused", nhwc=False),
                "FusedTinyViT (NHWC, oneDNN post-ops, SDPA)": dict(encoder="fused")}
    if onnx:
        variants["onnx runtime"] = dict(encoder="onnx")
    if compile_encoder:
        variants["torch.compile"] = dict(encoder="compile")
    fast = {name: FastLiteMedSAMBackend(device=dev, **kw) for name, kw in variants.items()}
    if dev == "cpu":  # the same encoder with plain torch ops in place of oneDNN's fused post-ops
        from .foundation.litemedsam_encoder import FusedTinyViT, _Ops

        unfused = FastLiteMedSAMBackend(device=dev)
        if isinstance(unfused._encode, FusedTinyViT):
            unfused._encode.ops = _Ops(False)
            fast["FusedTinyViT, plain torch ops"] = unfused
    results: dict[str, dict] = {}

    def clock(fn):
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        w, c = time.perf_counter(), time.process_time()
        fn()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - w, time.process_time() - c

    def record(name, wall, cpu, per):
        entry = results.setdefault(name, {"wall": [], "cpu": [], "per": per})
        entry["wall"].append(wall)
        entry["cpu"].append(cpu)

    # warm-up (compile, ONNX export, first-call allocations)
    for b in fast.values():
        b.set_image(work[0][0])
        b.predict(work[0][1])
    backends["plain"].set_image(work[0][0])
    backends["plain"].predict(work[0][1])
    plain = backends["plain"]
    for _ in range(max(int(repeats), 1)):
        # encoder, one pass per slice on the cropped slice
        record("encoder: plain module", *clock(lambda: [plain.set_image(w[0]) for w in work]), "slice")
        for name, b in fast.items():
            record(f"encoder: {name}", *clock(lambda b=b: [b.set_image(w[0]) for w in work]), "slice")
        main = fast["FusedTinyViT (NHWC, oneDNN post-ops, SDPA)"]
        for bs in batches:
            if bs > 1:
                record(f"encoder: FusedTinyViT, batch {bs}",
                       *clock(lambda m=main, n=bs: [m.encode([w[0] for w in work[i : i + n]])
                                                    for i in range(0, len(work), n)]),
                       "slice")
        # decoder, all boxes of a slice at once, on a fixed embedding per slice
        embs = main.encode([w[0] for w in work])

        def plain_decode(embs=embs):
            for w, e in zip(work, embs):
                plain._embedding, plain._image_hw, plain._scale, plain._resized_hw = e.embedding[None], e.image_hw, e.scale, e.resized_hw
                plain.predict(w[1])

        record("decoder: SAM mask decoder", *clock(plain_decode), "box")
        record("decoder: FastMaskDecoder",
               *clock(lambda m=main, es=embs: [m.predict_on(e, w[1]) for w, e in zip(work, es)]), "box")
        # naive: whole slice, one pass per structure
        def naive():
            for w in work:
                for box in w[3]:
                    plain.set_image(w[2])
                    plain.predict(box[None])

        record("naive slice (whole slice, pass per structure)", *clock(naive), "slice")
    table = {}
    for name, e in results.items():
        count = len(work) if e["per"] == "slice" else n_boxes
        table[name] = {"per": e["per"], "wall_s": min(e["wall"]) / count, "cpu_s": min(e["cpu"]) / count}
    return {"slices": len(work), "boxes": n_boxes, "threads": torch.get_num_threads(), "device": dev,
            "machine": _machine(), "levers": table}


def format_levers(r: dict) -> list[str]:
    lines = [f"levers on {r['slices']} DK-prompted MNI152 slices ({r['boxes']} boxes); {r['machine']}; "
             f"{r['threads']} thread(s); {r['device']}",
             f"{'lever':<54}{'per':>6}{'wall ms':>10}{'cpu ms':>10}{'x plain':>9}"]
    levers = r["levers"]
    base = {"slice": levers.get("encoder: plain module"), "box": levers.get("decoder: SAM mask decoder")}
    for name, e in levers.items():
        ref = base.get(e["per"])
        ratio = ref["wall_s"] / e["wall_s"] if ref and not name.startswith("naive") else float("nan")
        lines.append(f"{name:<54}{e['per']:>6}{1000 * e['wall_s']:>10.0f}{1000 * e['cpu_s']:>10.0f}{ratio:>9.2f}")
    return lines
