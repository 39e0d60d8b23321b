"""Renders, the QC report and the re-identification check on a phantom head with a nose."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from deface import cli, facecheck
from deface.evaluation import reorient
from deface.render import VIEWS, render_views
from tests.conftest import make_phantom, oracle_probs


def _phantom_arrays():
    img = make_phantom(shape=(60, 72, 64), zooms=(3.4, 3.0, 3.2), angle_deg=10)
    return img, np.asanyarray(img.dataobj).astype(np.float32)


def test_renders_change_only_where_the_face_was_removed(defacer):
    img, data = _phantom_arrays()
    volume, canon, registration = defacer.prepare(img)
    result = defacer.apply(volume, canon, oracle_probs(defacer, canon), registration)
    after = result.volume.scaled(result.raw)
    before_views, threshold = render_views(data, img.affine, spacing=2.0)
    after_views, _ = render_views(after, img.affine, threshold=threshold, spacing=2.0)
    assert set(before_views) == set(VIEWS)
    front_b, front_a = before_views["front"].astype(int), after_views["front"].astype(int)
    changed = np.abs(front_b - front_a) > 10
    assert changed.mean() > 0.01  # the nose and face are gone from the front view
    rows = np.nonzero(changed.any(1))[0]
    # the face lies below z = 10 mm: the top of the head (upper 40 % of the picture) is unchanged
    top = int(0.4 * front_b.shape[0])
    assert not changed[:top].any() and rows.min() >= top
    # the back of the head: the profile view's posterior half is unchanged
    prof_b, prof_a = before_views["profile"].astype(int), after_views["profile"].astype(int)
    half = prof_b.shape[1] // 2
    assert np.abs(prof_b - prof_a)[:, half:].max() <= 10 or np.abs(prof_b - prof_a)[:, :half].max() <= 10


def test_render_is_orientation_independent():
    img, data = _phantom_arrays()
    moved, moved_affine = reorient(data, img.affine, (2, 0, 1), (True, False, True))  # same head, other axes
    a, _ = render_views(data, img.affine, {"front": 0.0}, spacing=2.0)
    b, _ = render_views(moved, moved_affine, {"front": 0.0}, spacing=2.0)
    pa, pb = a["front"].astype(int), b["front"].astype(int)
    h, w = min(pa.shape[0], pb.shape[0]), min(pa.shape[1], pb.shape[1])
    # the lattice-snapped grids may differ by one row or column at either end
    diffs = [np.mean(np.abs(pa[i:i + h, j:j + w] - pb[k:k + h, m:m + w]) > 20)
             for i in (0, pa.shape[0] - h) for j in (0, pa.shape[1] - w)
             for k in (0, pb.shape[0] - h) for m in (0, pb.shape[1] - w)]
    assert min(diffs) < 0.01


def _crop(pic: np.ndarray) -> np.ndarray:
    h, w = pic.shape
    return pic[int(0.5 * h):int(0.85 * h), int(0.35 * w):int(0.65 * w)].astype(float)


def _same_face_detector(reference: np.ndarray):
    """Stand-in detector: 'a face' when the lower middle of the picture still matches the
    original's face region (normalised cross-correlation > 0.9)."""
    ref = _crop(reference)
    ref = (ref - ref.mean()) / (ref.std() + 1e-6)

    def detect(pic: np.ndarray) -> list[tuple[int, int, int, int]]:
        c = _crop(pic)
        ncc = float(((c - c.mean()) / (c.std() + 1e-6) * ref).mean())
        return [(0, 0, 1, 1)] if ncc > 0.9 else []
    return detect


def test_check_flags_undefaced_and_passes_defaced(defacer):
    img, data = _phantom_arrays()
    views, threshold = render_views(data, img.affine, {"front": 0.0}, spacing=2.0)
    detector = _same_face_detector(views["front"])
    same = facecheck.check_renders(views, views, detector=detector)
    assert same.original_views["front"] == 1 and not same.passed and same.face_found_after == ["front"]
    volume, canon, registration = defacer.prepare(img)
    result = defacer.apply(volume, canon, oracle_probs(defacer, canon), registration)
    after, _ = render_views(result.volume.scaled(result.raw), img.affine, {"front": 0.0}, threshold=threshold, spacing=2.0)
    defaced = facecheck.check_renders(views, after, detector=detector)
    assert defaced.passed and defaced.face_found_after == []


def test_refaced_check_passes_on_a_new_face_and_fails_on_the_persons():
    """--mode reface: a face after defacing is expected; the check fails only when it is the
    input's face by the recogniser's threshold (or, without a front face to compare, passes)."""
    views = {"front": 1, "left45": 1}
    new_face = facecheck.CheckResult(views, views, distance=0.71, refaced=True)
    same_face = facecheck.CheckResult(views, views, distance=0.35, refaced=True)
    no_front = facecheck.CheckResult(views, {"front": 0, "left45": 1}, distance=None, refaced=True)
    assert new_face.passed and not same_face.passed and no_front.passed
    assert not facecheck.CheckResult(views, views, distance=0.71).passed  # any other mode: a face fails


def test_qc_batch_writes_pngs_and_one_report(tmp_path, tiny_weights):
    for i in range(2):
        nib.save(make_phantom(angle_deg=5 * i), str(tmp_path / f"sub-{i}_T1w.nii.gz"))
    out = tmp_path / "out"
    assert cli.main([str(tmp_path), "-o", str(out), "--qc", "--qc-resolution", "3", "-q", "--weights", str(tiny_weights), "--device", "cpu"]) == 0
    assert (out / "sub-0_T1w_defaced.png").exists() and (out / "sub-1_T1w_defaced.png").exists()
    report = (out / "deface_report.html").read_text()
    assert report.count("<tr") == 2 and "data:image/png;base64," in report
    assert "sub-0_T1w" in report and "sub-1_T1w" in report


@pytest.mark.skipif(not facecheck.available(), reason="needs the [qc] extra (dlib-bin, face-recognition-models)")
def test_real_detector_runs_on_renders():
    img, data = _phantom_arrays()
    views, _ = render_views(data, img.affine, spacing=2.0)
    result = facecheck.check_renders(views, views)
    assert set(result.original_views) == set(VIEWS)  # a phantom is no face; the call itself must work
