"""One encoder pass of each LiteMedSAM encoder implementation, interleaved in one process.

    PYTHONPATH=BasalSegSAM .venv/bin/python benchmarks/encoder_levers.py [--threads 2] [--repeats 4] [--bands 32,64,0]

Prints, per implementation, the largest difference of its embedding from the plain module's on
a random 256 x 256 image, and the median wall and CPU time of ``--repeats`` passes (the
implementations take turns, so load changes hit all of them alike).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--bands", default="", help="also FusedTinyViT with these first-stage band heights (0: unbanded)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from basalseg.foundation.litemedsam import LiteMedSAMBackend
    from basalseg.foundation.litemedsam_encoder import FusedTinyViT, fold_batchnorm, optimise_encoder

    plain = LiteMedSAMBackend(device="cpu").net.image_encoder
    folded = fold_batchnorm(plain)
    encoders = {
        "plain module": plain,
        "BN folded + banded stage 0 (previous default)": optimise_encoder(plain, "cpu", nhwc=False),
        "FusedTinyViT (default)": FusedTinyViT(folded),
        "FusedTinyViT, plain torch ops": FusedTinyViT(folded, fused_ops=False),
    }
    for band in filter(None, args.bands.split(",")):
        encoders[f"FusedTinyViT, band {int(band) or 'none'}"] = FusedTinyViT(folded, band=int(band) or None)
    x = torch.rand(1, 3, 256, 256).contiguous(memory_format=torch.channels_last)
    times: dict[str, list] = {k: [] for k in encoders}
    with torch.inference_mode():
        ref = plain(x)
        for name, enc in encoders.items():
            print(f"{name:<48} max |diff| {float((enc(x) - ref).abs().max()):.1e} (embedding max {float(ref.abs().max()):.2f})")
        for _ in range(args.repeats):
            for name, enc in encoders.items():
                w, c = time.perf_counter(), time.process_time()
                enc(x)
                times[name].append((time.perf_counter() - w, time.process_time() - c))
    base = np.median(np.array(times["plain module"]), axis=0)
    for name, v in times.items():
        wall, cpu = np.median(np.array(v), axis=0)
        print(f"{name:<48} wall {wall:6.3f} s  cpu {cpu:6.3f} s  x plain {base[0] / wall:4.2f} (cpu {base[1] / cpu:4.2f})")


if __name__ == "__main__":
    main()
