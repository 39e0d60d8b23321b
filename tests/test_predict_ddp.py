"""Multi-process batch prediction (Lightning DDP, gloo on CPU): every file written exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib

from tests.conftest import make_phantom


def test_two_processes_write_every_file_once(tmp_path, tiny_weights):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(7):
        nib.save(make_phantom(shape=(30, 36, 34), zooms=(6.5, 6.0, 6.2), angle_deg=i), str(src / f"s{i}.nii.gz"))
    (src / "broken.nii.gz").write_bytes(b"not an image")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PL_DISABLE_FORK": "1"}
    proc = subprocess.run([sys.executable, "-m", "deface.predict", str(src), "-o", str(out), "--weights",
                           str(tiny_weights), "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--batch-size", "2", "--save-mask"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifests = sorted(out.glob(".deface_rank*.tsv"))
    assert [m.name for m in manifests] == [".deface_rank0.tsv", ".deface_rank1.tsv"]
    lines = [line.split("\t") for m in manifests for line in m.read_text().splitlines()]
    files = [line[0] for line in lines]
    assert sorted(files) == sorted(str(p) for p in src.iterdir()) and len(files) == len(set(files)) == 8
    assert {Path(f).name: status for f, status, _ in lines}["broken.nii.gz"] == "failed"
    assert len(list(out.glob("*_defaced.nii.gz"))) == 7 and len(list(out.glob("*_defacemask.nii.gz"))) == 7
