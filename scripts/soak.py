"""Soak run: deface many small files in one process; print throughput and memory over time.

    python scripts/soak.py [--files 500] [--weights DIR | --tiny] [--threads 2]

Inputs are copies of the shipped example head (2 mm Colin27), each shifted and rotated a little
and stored with a varying dtype, so every file takes the full path (read, network, postprocess,
write). Resident memory (RSS) is sampled every ``--every`` files; the run passes when RSS after
warm-up grows by less than 10 %.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def make_inputs(folder: Path, n: int) -> None:
    from deface.atlas import euler
    from deface.cli import EXAMPLE_HEAD

    src = nib.load(str(EXAMPLE_HEAD))
    data = np.asanyarray(src.dataobj).astype(np.float32)
    dtypes = [np.int16, np.float32, np.uint8, np.int32]
    for i in range(n):
        rot = euler(float(i % 11 - 5), 0.0, 0.0)
        affine = src.affine.copy()
        affine[:3, :3] = rot @ affine[:3, :3]
        affine[:3, 3] += i % 5
        dtype = dtypes[i % len(dtypes)]
        scale = 255.0 / data.max() if dtype == np.uint8 else 1.0
        nib.save(nib.Nifti1Image((data * scale).astype(dtype), affine), str(folder / f"sub-{i:04d}_T1w.nii.gz"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=500)
    p.add_argument("--every", type=int, default=50, help="sample memory every N files")
    p.add_argument("--weights", default=None)
    p.add_argument("--tiny", action="store_true", help="a tiny random network (IO and postprocessing only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from deface.inference import Defacer
    from deface import io

    if args.tiny:
        from deface.network import TINY_ARCHITECTURE, build_network

        torch.manual_seed(0)
        meta = {"architecture": TINY_ARCHITECTURE, "preprocessing": {"spacing_mm": 2.0, "multiple": 4}}
        defacer = Defacer(network=build_network(TINY_ARCHITECTURE), metadata=meta, device=args.device)
    else:
        defacer = Defacer(weights=args.weights, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in", Path(tmp) / "out"
        src.mkdir()
        out.mkdir()
        make_inputs(src, args.files)
        files = sorted(src.iterdir())
        samples = []
        start = time.perf_counter()
        for i, path in enumerate(files, 1):
            result = defacer.deface(path)
            io.save(result.volume, result.raw, out / path.name)
            if i % args.every == 0 or i == len(files):
                elapsed = time.perf_counter() - start
                samples.append((i, rss_mb()))
                print(f"{i:5d} files  {elapsed:7.1f} s  {i / elapsed:6.2f} files/s  RSS {samples[-1][1]:7.1f} MB",
                      flush=True)
        total = time.perf_counter() - start
    warm = samples[0][1]
    growth = (max(s[1] for s in samples[1:]) - warm) / warm * 100 if len(samples) > 1 else 0.0
    print(f"{len(files)} files in {total:.1f} s ({len(files) / total:.2f} files/s); "
          f"RSS after warm-up {warm:.0f} MB, peak growth {growth:+.1f} % ({'OK' if growth < 10 else 'FAIL'} < 10 %)")
    return 0 if growth < 10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
