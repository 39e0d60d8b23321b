"""kill -9 in the middle of a batch leaves no partial output; --skip-existing finishes the rest,
and the result is identical to one uninterrupted run."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.conftest import make_phantom

N_FILES = 30


def _batch(folder: Path) -> None:
    folder.mkdir()
    for i in range(N_FILES):
        img = make_phantom(shape=(30 + i % 3, 36, 34), zooms=(6.5, 6.0, 6.2), angle_deg=i % 7)
        nib.save(img, str(folder / f"sub-{i:02d}_T1w.nii.gz"))


def _command(src: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deface.cli", str(src), "-o", str(out), "--weights", str(weights),
            "--device", "cpu", "--save-mask", "-q", *extra]


def _content(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes())  # the gzip header holds a time stamp


def test_kill_and_resume(tmp_path, tiny_weights):
    src, killed, clean = tmp_path / "in", tmp_path / "killed", tmp_path / "clean"
    _batch(src)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(_command(src, killed, tiny_weights), env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("*_defaced.nii.gz"))) < 6:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(killed.glob("*_defaced.nii.gz"))
    assert 0 < len(done) < N_FILES, "the kill must land in the middle of the batch"
    for path in done:  # whatever exists is complete, with its mask
        assert np.asanyarray(nib.load(str(path)).dataobj).size > 0  # reads to the end: not truncated
        mask = path.with_name(path.name.replace("_defaced", "_defacemask"))
        assert mask.exists()

    rerun = subprocess.run(_command(src, killed, tiny_weights, "--skip-existing"), env=env, capture_output=True)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert subprocess.run(_command(src, clean, tiny_weights), env=env).returncode == 0
    names = sorted(p.name for p in clean.iterdir())
    assert sorted(p.name for p in killed.iterdir()) == names  # no temporary file left either
    assert len(names) == 2 * N_FILES
    for name in names:
        assert _content(killed / name) == _content(clean / name), name
