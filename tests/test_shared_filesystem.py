"""Several jobs writing into one folder on a shared filesystem (SLURM array jobs on other nodes):
a temporary output is removed only when it is provably stale."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import pytest

from deface import cli, io
from tests.conftest import make_phantom

SMALL = dict(shape=(30, 36, 34), zooms=(6.5, 6.0, 6.2))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_provably_stale_temporaries_are_removed(tmp_path, tiny_weights):
    src, out = tmp_path / "head.nii.gz", tmp_path / "out"
    nib.save(make_phantom(**SMALL), str(src))
    out.mkdir()
    here, pid = io.writer_tag(), dead_pid()
    other = "0123abcd" if here != "0123abcd" else "fedc9876"
    names = {
        "another node, still writing": f".a_defaced.nii.gz.{other}-{pid}.tmp.nii.gz",
        "this node, its writer alive": f".b_defaced.nii.gz.{here}-{os.getpid()}.tmp.nii.gz",
        "this node, its writer dead": f".c_defaced.nii.gz.{here}-{pid}.tmp.nii.gz",
        "another node, a day old": f".d_defaced.nii.gz.{other}-{pid}.tmp.nii.gz",
        "an old untagged name, a day old": f".e_defaced.nii.gz.{pid}.tmp.nii.gz",
        "an old untagged name, fresh": f".f_defaced.nii.gz.{pid}.tmp.nii.gz",
        "a DICOM series folder of a dead writer": f".series003.{here}-{pid}.tmp",
    }
    for what, name in names.items():
        (out / name).mkdir() if "DICOM" in what else (out / name).write_bytes(b"partial")
        if "day old" in what:
            old = time.time() - io.STALE_AFTER_S - 60
            os.utime(out / name, (old, old))
    assert cli.main([str(src), "-o", str(out), "--weights", str(tiny_weights), "-q"]) == 0
    left = {p.name for p in out.iterdir()}
    for what, name in names.items():
        kept = what in ("another node, still writing", "this node, its writer alive", "an old untagged name, fresh")
        assert (name in left) == kept, what
    assert "head_defaced.nii.gz" in left


def test_a_job_in_another_pid_namespace_keeps_our_temporary(tmp_path, tiny_weights):
    """The two-node case for real: the second run has its own PID namespace (as a job on another
    node has), where the first run's pid does not exist."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                                                         capture_output=True).returncode != 0:
        pytest.skip("needs unshare with PID namespaces (root)")
    src, out = tmp_path / "head.nii.gz", tmp_path / "out"
    nib.save(make_phantom(**SMALL), str(src))
    out.mkdir()
    writing = io.temporary_path(out / "other_defaced.nii.gz")  # this process, still writing
    writing.write_bytes(b"partial")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "deface.cli",
                          str(src), "-o", str(out), "--weights", str(tiny_weights), "--device", "cpu", "-q"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert writing.exists() and (out / "head_defaced.nii.gz").exists()
