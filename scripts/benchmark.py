"""Seconds per stage and peak memory for defacing a 1 mm 256^3 head (CPU, and CUDA when present).

    python scripts/benchmark.py [--threads 2] [--repeats 3] [--weights DIR]
    python scripts/benchmark.py --synthesis 20 [--cache data_cache]   # seconds per training sample

The head is the shipped example (Colin27) resampled to 1 mm on a 256^3 int16 grid.
Targets on 2 CPU cores: <= 3 s end to end, <= 2 GB peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch


def make_head(folder: Path) -> Path:
    from deface.cli import EXAMPLE_HEAD
    from deface.preprocessing import Grid, resample

    src = nib.load(str(EXAMPLE_HEAD))
    affine = np.eye(4)
    affine[:3, 3] = -128.0 + np.array([0.0, 10.0, -20.0])
    data = resample(torch.from_numpy(np.asarray(src.dataobj, np.float32))[None], src.affine,
                    Grid((256, 256, 256), affine))[0].numpy()
    path = folder / "head_1mm_256.nii.gz"
    nib.save(nib.Nifti1Image((data * 10).astype(np.int16), affine), str(path))
    return path


def bench(device: str, path: Path, out: Path, repeats: int, weights: str | None) -> None:
    from deface import io
    from deface.inference import Defacer

    d = Defacer(weights=weights, device=device)
    rows, atlas = [], []
    for i in range(repeats + 1):
        t = [time.perf_counter()]
        volume = io.load(path)
        t.append(time.perf_counter())
        volume, canon = d.prepare(volume)
        t.append(time.perf_counter())
        probs = d.predict([canon])[0]
        if device == "cuda":
            torch.cuda.synchronize()
        t.append(time.perf_counter())
        result = d.apply(volume, canon, probs)
        t.append(time.perf_counter())
        atlas.append(result.stats["atlas_s"])
        io.save(volume, result.raw, out)
        t.append(time.perf_counter())
        if i > 0:  # the first run warms up
            rows.append(np.diff(t))
    m = np.median(rows, axis=0)
    names = ["load", "preprocess", "network", "postprocess", "save"]
    print(f"{device}: " + "  ".join(f"{n} {v:.2f}s" for n, v in zip(names, m)) + f"  total {m.sum():.2f}s"
          f"  (preprocess includes the atlas registration, {np.median(atlas[1:]):.2f}s)")


def bench_synthesis(cache: Path, n: int) -> None:
    """Seconds per training sample (default data config patch) in one thread, as a DataLoader worker
    runs it; with W workers on W cores the loader makes W / seconds samples per second."""
    from deface.data.cache import load_subject
    from deface.data.synthesis import SynthConfig, synthesize

    torch.set_num_threads(1)
    cfg = SynthConfig()
    rng = np.random.default_rng(0)
    for pattern in ("brainweb_*.npz", "real_*.npz"):
        files = sorted(cache.glob(pattern))[:4]
        if not files:
            print(f"{pattern}: none in {cache}")
            continue
        subjects = [load_subject(f) for f in files]
        synthesize(subjects[0], cfg, rng)  # warm-up
        t0 = time.perf_counter()
        for i in range(n):
            synthesize(subjects[i % len(subjects)], cfg, rng)
        print(f"{pattern}: {(time.perf_counter() - t0) / n:.3f} s per {tuple(cfg.patch)} sample at "
              f"{cfg.spacing} mm (1 thread, mean of {n})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--synthesis", type=int, default=0, metavar="N", help="time N training samples instead")
    p.add_argument("--cache", type=Path, default=Path("data_cache"), help="training cache for --synthesis")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--weights", default=None)
    args = p.parse_args()
    if args.synthesis:
        bench_synthesis(args.cache, args.synthesis)
        return
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_head(Path(tmp))
        print(f"input: 256x256x256 int16, 1 mm; torch threads {args.threads}")
        bench("cpu", path, Path(tmp) / "out.nii.gz", args.repeats, args.weights)
        if torch.cuda.is_available():
            bench("cuda", path, Path(tmp) / "out.nii.gz", args.repeats, args.weights)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB (whole process, including the test-head creation)")


if __name__ == "__main__":
    main()
