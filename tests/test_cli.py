"""deface-infer: naming, overwrite rules, exit codes, --applyto, --help without torch."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from deface import cli
from tests.conftest import make_phantom


def run(args, weights):
    return cli.main([*map(str, args), "--weights", str(weights), "--device", "cpu", "-q"])


def test_help_does_not_import_torch():
    code = "import sys; from deface import cli; cli.build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    help_out = subprocess.run([sys.executable, "-m", "deface.cli", "--help"], capture_output=True, text=True)
    assert help_out.returncode == 0 and "--applyto" in help_out.stdout


def test_default_name_beside_input_and_no_overwrite(tmp_path, tiny_weights):
    src = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(make_phantom(), str(src))
    assert run([src, "--save-mask"], tiny_weights) == 0
    out = tmp_path / "sub-01_T1w_defaced.nii.gz"
    assert out.exists() and (tmp_path / "sub-01_T1w_defacemask.nii.gz").exists()
    before = out.read_bytes()
    assert run([src], tiny_weights) == 1  # exists, no --force
    assert out.read_bytes() == before
    assert run([src, "--skip-existing"], tiny_weights) == 0
    assert run([src, "--force"], tiny_weights) == 0


def test_never_overwrites_input(tmp_path, tiny_weights):
    src = tmp_path / "a.nii.gz"
    nib.save(make_phantom(), str(src))
    data = src.read_bytes()
    assert run([src, "--outfile", src, "--force"], tiny_weights) == 2
    assert src.read_bytes() == data


def test_usage_errors_exit_2(tmp_path, tiny_weights):
    assert run([tmp_path / "missing.nii.gz"], tiny_weights) == 2
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    for p in (a, b):
        nib.save(make_phantom(), str(p))
    assert run([a, b, "--outfile", tmp_path / "o.nii.gz"], tiny_weights) == 2


def test_same_name_from_two_folders_is_refused(tmp_path, tiny_weights):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        nib.save(make_phantom(), str(tmp_path / d / "t1.nii.gz"))
    assert run([tmp_path / "x", tmp_path / "y", "-o", tmp_path / "out"], tiny_weights) == 2


def test_bad_file_fails_alone(tmp_path, tiny_weights):
    folder = tmp_path / "in"
    folder.mkdir()
    nib.save(make_phantom(), str(folder / "good.nii.gz"))
    (folder / "bad.nii.gz").write_bytes(b"garbage")
    assert run([folder, "-o", tmp_path / "out"], tiny_weights) == 1
    assert (tmp_path / "out" / "good_defaced.nii.gz").exists()
    assert not (tmp_path / "out" / "bad_defaced.nii.gz").exists()


def test_applyto_resampled_grid(tmp_path, tiny_weights):
    t1, t2 = tmp_path / "t1.nii.gz", tmp_path / "t2.nii.gz"
    nib.save(make_phantom(), str(t1))
    nib.save(make_phantom(shape=(40, 50, 44), zooms=(5.0, 4.5, 5.0), angle_deg=5.0), str(t2))
    assert run([t1, "--applyto", t2, "-o", tmp_path / "out", "--save-mask"], tiny_weights) in (0,)
    out2 = tmp_path / "out" / "t2_defaced.nii.gz"
    assert out2.exists()
    a, b = nib.load(str(t2)), nib.load(str(out2))
    assert a.shape == b.shape and np.array_equal(a.affine, b.affine)


def test_existing_applyto_output_is_refused_before_any_work(tmp_path, tiny_weights):
    t1, t2, out = tmp_path / "t1.nii.gz", tmp_path / "t2.nii.gz", tmp_path / "out"
    nib.save(make_phantom(), str(t1))
    nib.save(make_phantom(angle_deg=5.0), str(t2))
    out.mkdir()
    (out / "t2_defaced.nii.gz").write_bytes(b"an earlier result")
    assert run([t1, "--applyto", t2, "-o", out], tiny_weights) == 2
    assert not (out / "t1_defaced.nii.gz").exists()  # refused before the work, not after t1 was written
    assert run([t1, "--applyto", t2, "-o", out, "--force"], tiny_weights) == 0
    assert nib.load(str(out / "t2_defaced.nii.gz")).shape == make_phantom().shape


@pytest.mark.slow  # registers the atlas to the phantom (30 s); tests/test_reface.py covers Defacer.replace
def test_reface_with_applyto_changes_only_the_mask_in_both(tmp_path, tiny_weights):
    t1, t2 = tmp_path / "t1.nii.gz", tmp_path / "t2.nii.gz"
    nib.save(make_phantom(), str(t1))
    ph = make_phantom()
    nib.save(nib.Nifti1Image((1000 - np.asanyarray(ph.dataobj)).astype(np.int16), ph.affine, ph.header), str(t2))
    out = tmp_path / "out"
    assert run([t1, "--applyto", t2, "-o", out, "--save-mask", "--mode", "reface"], tiny_weights) == 0
    mask = np.asarray(nib.load(str(out / "t1_defacemask.nii.gz")).dataobj) > 0
    for src, dst in ((t1, out / "t1_defaced.nii.gz"), (t2, out / "t2_defaced.nii.gz")):
        a, b = np.asanyarray(nib.load(str(src)).dataobj), np.asanyarray(nib.load(str(dst)).dataobj)
        assert a.dtype == b.dtype and not ((a != b) & ~mask).any()  # the tiny random network may find no face


def test_scrub_flag_clears_descrip(tmp_path, tiny_weights):
    img = make_phantom()
    img.header["descrip"] = b"Jane Doe"
    src = tmp_path / "a.nii.gz"
    nib.save(img, str(src))
    assert run([src, "-o", tmp_path / "out", "--scrub"], tiny_weights) == 0
    assert nib.load(str(tmp_path / "out" / "a_defaced.nii.gz")).header["descrip"] == b""
    assert run([src, "-o", tmp_path / "kept"], tiny_weights) == 0
    assert nib.load(str(tmp_path / "kept" / "a_defaced.nii.gz")).header["descrip"] == b"Jane Doe"


def test_help_fits_a_screen_and_names_only_real_options():
    out = subprocess.run([sys.executable, "-m", "deface.cli", "--help"], capture_output=True, text=True,
                         env={**__import__("os").environ, "COLUMNS": "80"})
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) <= 40 and max(map(len, lines)) <= 80
    assert "BIDS_DIR OUT_DIR participant" in lines[1]
    parser = cli.build_parser()
    known = {s for a in parser._actions for s in a.option_strings}
    import re

    named = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", out.stdout))
    assert named <= known, named - known
    full = subprocess.run([sys.executable, "-m", "deface.cli", "--help-all"], capture_output=True, text=True)
    assert all(option in full.stdout for option in known)


def test_ears_flags_leave_the_default_to_the_defacer():
    """No flag: None (the Defacer removes the ears whenever its atlas guard is on);
    --keep-ears: False; --ears: True (even with --no-atlas-guard)."""
    parser = cli.build_parser()
    assert parser.parse_args(["a.nii"]).ears is None
    assert parser.parse_args(["a.nii", "--keep-ears"]).ears is False
    assert parser.parse_args(["a.nii", "--ears", "--no-atlas-guard"]).ears is True


def test_errors_come_before_any_work(tmp_path, tiny_weights, monkeypatch, capsys):
    """Each mistake gets one line and exit 2 before the first file is processed."""
    import os
    import tempfile

    folder = tmp_path / "in"
    folder.mkdir()
    src = folder / "a.nii.gz"
    nib.save(make_phantom(shape=(30, 36, 34), zooms=(6.5, 6.0, 6.2)), str(src))
    out = tmp_path / "out"
    spellings = [[src, src], [src, folder / ".." / "in" / "a.nii.gz"], [folder, src], [folder, str(folder) + "/*.nii.gz"]]
    for inputs in spellings:  # the same input twice, under any spelling
        assert run([*inputs, "-o", out], tiny_weights) == 2
        assert "given twice" in capsys.readouterr().err
    assert run([src, "--outfile", tmp_path / "a.txt"], tiny_weights) == 2
    assert ".nii.gz, .nii or .mgz" in capsys.readouterr().err
    out.mkdir()
    (out / "deface_report.html").write_text("an earlier report")
    assert run([src, "-o", out, "--qc"], tiny_weights) == 2
    assert "deface_report.html exists" in capsys.readouterr().err

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    if os.geteuid() == 0:  # root writes anywhere: make the folder refuse as the kernel would for a user
        monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    else:
        out.chmod(0o500)
    try:
        assert run([src, "-o", out], tiny_weights) == 2
        assert "cannot write output there" in capsys.readouterr().err
    finally:
        out.chmod(0o700)
    assert not (out / "a_defaced.nii.gz").exists()


def test_single_slice_is_called_a_single_slice(tmp_path):
    from deface import io

    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((120, 120, 1), np.int16), np.eye(4)), str(path))
    with pytest.raises(io.InputError, match="single slice"):
        io.load(path)


def test_unwritable_report_gives_one_line_and_the_summary(tmp_path, tiny_weights, monkeypatch, capsys, caplog):
    from deface import qc

    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    for p in (a, b):
        nib.save(make_phantom(shape=(30, 36, 34), zooms=(6.5, 6.0, 6.2)), str(p))

    def refuse(rows, path):
        raise PermissionError(13, "Permission denied", str(path))

    from deface import facecheck

    monkeypatch.setattr(qc, "html_report", refuse)
    monkeypatch.setattr(facecheck, "available", lambda: False)  # the detector is not what is tested here
    code = cli.main([str(a), str(b), "-o", str(tmp_path / "out"), "--qc", "--qc-resolution", "4",
                     "--weights", str(tiny_weights)])
    err = capsys.readouterr().err
    assert code == 0 and any("cannot write the QC report" in r.getMessage() for r in caplog.records)
    assert "2 done, 0 failed" in err and "Traceback" not in err


def test_printed_time_is_wall_clock_from_read_to_written(tmp_path, tiny_weights, monkeypatch, caplog):
    import logging
    import re
    import time

    from deface.inference import Defacer

    src = tmp_path / "a.nii.gz"
    nib.save(make_phantom(shape=(30, 36, 34), zooms=(6.5, 6.0, 6.2)), str(src))
    slow_prepare = Defacer.prepare

    def prepare(self, source):  # a slow disk: the read must count
        time.sleep(1.0)
        return slow_prepare(self, source)

    monkeypatch.setattr(Defacer, "prepare", prepare)
    with caplog.at_level(logging.INFO, logger="deface"):
        assert cli.main([str(src), "-o", str(tmp_path / "out"), "--weights", str(tiny_weights)]) == 0
    seconds = [float(m.group(1)) for r in caplog.records if (m := re.search(r"\((\d+\.\d+) s\)$", r.getMessage()))]
    assert seconds and seconds[0] >= 1.0


def test_verbose_shows_stage_timings_and_no_third_party_debug(tmp_path, tiny_weights):
    src = tmp_path / "a.nii.gz"
    nib.save(make_phantom(shape=(30, 36, 34), zooms=(6.5, 6.0, 6.2)), str(src))
    out = subprocess.run([sys.executable, "-m", "deface.cli", str(src), "-o", str(tmp_path / "out"), "-v", "--qc",
                          "--qc-resolution", "4", "--weights", str(tiny_weights), "--device", "cpu"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    debug = [line for line in out.stderr.splitlines() if line.startswith("DEBUG")]
    assert any("seconds: read+preprocess" in line for line in debug)
    assert all(str(src) in line for line in debug), debug  # only deface's own debug lines
