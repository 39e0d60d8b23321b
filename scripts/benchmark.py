"""Seconds per stage and peak memory for defacing a 1 mm 256^3 head (CPU, and CUDA when present).

    python scripts/benchmark.py [--threads 2] [--repeats 3] [--weights DIR]
    python scripts/benchmark.py --synthesis 20 [--cache data_cache]   # seconds per training sample
    python scripts/benchmark.py --versus-niimath [--runs 4] [--batch 20] [--input HEAD]   # whole processes beside the peer

--versus-niimath (needs `pip install niimath pydeface`, for the benchmark only: pydeface ships the
template and face mask that `niimath FILE -deface TEMPLATE MASK OUT` uses) times, on one 1 mm
256x256x176 sagittal head and in the same process tree, alternating: a cold `deface-infer FILE`
process (wall clock, start to exit, peak RSS), the same for niimath, and the steady-state seconds
per head of a --batch-file deface-infer run; then the stages inside one process. ``--input`` times
a head of your own instead (e.g. a FLAIR: its registration takes several times a T1's).
Targets on 2 cores: a cold process <= 3 s, <= 1.5 s a head in a batch, >= 3x faster than niimath
in the same run, <= 2 GB RSS.

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
        volume, canon, registration = d.prepare(volume)
        t.append(time.perf_counter())
        probs = d.predict([canon])[0]
        if device == "cuda":
            torch.cuda.synchronize()
        t.append(time.perf_counter())
        result = d.apply(volume, canon, probs, registration)
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


def make_sagittal_head(folder: Path) -> Path:
    """The example head on a 1 mm 256x256x176 grid stored sagittally (P, I, R axes), as a 3D T1 comes off a scanner."""
    from deface.cli import EXAMPLE_HEAD
    from deface.preprocessing import Grid, resample

    src = nib.load(str(EXAMPLE_HEAD))
    affine = np.array([[0, 0, 1, -88.0], [-1, 0, 0, 128.0 + 10], [0, -1, 0, 128.0 - 20], [0, 0, 0, 1]])
    data = resample(torch.from_numpy(np.asarray(src.dataobj, np.float32))[None], src.affine,
                    Grid((256, 256, 176), affine))[0].numpy()
    path = folder / "head_1mm_256x256x176_sag.nii.gz"
    img = nib.Nifti1Image((data * 10).astype(np.int16), affine)
    img.set_qform(affine, 1)
    nib.save(img, str(path))
    return path


def timed(command: list[str], cwd: Path | None = None) -> tuple[float, float]:
    """(wall seconds from start to exit, peak RSS in MB) of one whole process, run in ``cwd``."""
    import os
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({proc.returncode}): {err[-500:]}")
    return wall, usage.ru_maxrss / 1024


def versus_niimath(runs: int, batch: int, source: Path | None = None) -> None:
    import shutil
    import subprocess
    import sys

    niimath = shutil.which("niimath")
    try:
        import pydeface
    except ImportError:
        pydeface = None
    if niimath is None or pydeface is None:
        raise SystemExit("needs niimath and pydeface: pip install niimath pydeface (for the benchmark only)")
    data = Path(pydeface.__file__).parent / "data"
    template, facemask = data / "mean_reg2mean.nii.gz", data / "facemask.nii.gz"
    deface = [sys.executable, "-m", "deface.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if source is None:
            head = make_sagittal_head(tmp)
        else:
            head = tmp / source.name
            shutil.copy(source, head)
        ext = ".nii.gz" if head.name.endswith(".nii.gz") else ".nii"
        img = nib.load(str(head))
        print(f"input: {head.name} ({img.get_data_dtype()}, {'x'.join(map(str, img.shape))}); "
              f"{runs} alternating runs of each whole process")
        cold, peer = [], []
        for i in range(runs):
            # run in tmp: ``python -m`` puts the working folder first on sys.path, so a checkout's own
            # deface/ would win over PYTHONPATH and the code this script imported (its "code:" line)
            cold.append(timed([*deface, str(head), "-o", str(tmp / "d"), "--force", "-q", "--device", "cpu"], tmp))
            peer.append(timed([niimath, str(head), "-deface", str(template), str(facemask), str(tmp / f"n{i}.nii.gz")]))
        folder = tmp / "batch"
        folder.mkdir()
        for i in range(batch):
            shutil.copy(head, folder / f"sub-{i:02d}_T1w{ext}")
        many = timed([*deface, str(folder), "-o", str(tmp / "b"), "-q", "--device", "cpu"], tmp)
        one = float(np.median([c[0] for c in cold]))
        nii = float(np.median([p[0] for p in peer]))
        per_head = (many[0] - one) / (batch - 1)
        print(f"deface-infer FILE (cold process): median {one:.2f} s wall, peak RSS {max(c[1] for c in cold):.0f} MB"
              f"   runs: {', '.join(f'{c[0]:.2f}' for c in cold)}")
        print(f"niimath FILE -deface (pydeface template and mask): median {nii:.2f} s wall, peak RSS "
              f"{max(p[1] for p in peer):.0f} MB   runs: {', '.join(f'{p[0]:.2f}' for p in peer)}")
        print(f"deface-infer, {batch} files in one process: {many[0]:.2f} s wall, {per_head:.2f} s a head in steady "
              f"state ((batch - cold) / {batch - 1}), peak RSS {many[1]:.0f} MB")
        print(f"speed vs niimath: {nii / one:.2f}x (cold process)   targets: cold <= 3 s, batch <= 1.5 s/head, "
              f">= 3x niimath, <= 2 GB")
        script = Path(__file__).with_name("stage_times.py")
        stages = subprocess.run([sys.executable, str(script), str(head)], capture_output=True, text=True)
        print(stages.stdout.strip() or stages.stderr[-1000:])


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
    p.add_argument("--versus-niimath", action="store_true", help="whole processes beside niimath -deface")
    p.add_argument("--runs", type=int, default=4, help="--versus-niimath: alternating runs of each")
    p.add_argument("--batch", type=int, default=20, help="--versus-niimath: files in the batch run")
    p.add_argument("--input", type=Path, default=None,
                   help="--versus-niimath: this NIfTI head instead of the 1 mm 256x256x176 example T1")
    p.add_argument("--cache", type=Path, default=Path("data_cache"), help="training cache for --synthesis")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--weights", default=None)
    args = p.parse_args()
    import deface  # a worktree's scripts (and deface-infer) import the editable install unless PYTHONPATH names it

    print(f"code: {Path(deface.__file__).parent}")
    if args.versus_niimath:
        versus_niimath(args.runs, args.batch, args.input)
        return
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
