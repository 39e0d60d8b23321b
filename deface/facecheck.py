"""Re-identification self-check: try to find (and recognise) a face in renders of a scan.

The detector and recogniser are dlib's (``pip install deface-mri[qc]``: ``dlib-bin`` and
``face-recognition-models``, whose model files ship inside the PyPI package; nothing is
downloaded at run time). A defaced scan passes when no view of its surface render holds a
detectable face. When a face is found in both the original and the defaced front view, the
embedding distance tells whether a recogniser would call them the same person (< 0.6 is a
match by dlib's convention).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

MATCH_DISTANCE = 0.6


class CheckUnavailable(RuntimeError):
    pass


def _models_dir() -> str:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise CheckUnavailable("face-recognition-models is not installed (pip install 'deface-mri[qc]')")
    return os.path.join(list(spec.submodule_search_locations)[0], "models")


@lru_cache(maxsize=1)
def _dlib():
    try:
        import dlib
    except ImportError as exc:
        raise CheckUnavailable("dlib is not installed (pip install 'deface-mri[qc]')") from exc
    models = _models_dir()
    return {
        "hog": dlib.get_frontal_face_detector(),
        "cnn": dlib.cnn_face_detection_model_v1(os.path.join(models, "mmod_human_face_detector.dat")),
        "shape": dlib.shape_predictor(os.path.join(models, "shape_predictor_5_face_landmarks.dat")),
        "embed": dlib.face_recognition_model_v1(os.path.join(models, "dlib_face_recognition_resnet_model_v1.dat")),
        "rect": dlib.rectangle,
    }


def available() -> bool:
    try:
        _dlib()
        return True
    except CheckUnavailable:
        return False


def detect_faces(picture: np.ndarray, cnn: bool = True) -> list[tuple[int, int, int, int]]:
    """Face boxes (left, top, right, bottom) in a uint8 grey picture (HOG, plus the CNN detector)."""
    models = _dlib()
    pic = np.ascontiguousarray(picture)
    boxes = [(r.left(), r.top(), r.right(), r.bottom()) for r in models["hog"](pic, 1)]
    if cnn:
        boxes += [(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()) for d in models["cnn"](pic, 0)]
    return boxes


def embedding(picture: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """dlib's 128-D face descriptor of the face in ``box``."""
    models = _dlib()
    rgb = np.ascontiguousarray(np.repeat(picture[..., None], 3, axis=-1))
    shape = models["shape"](rgb, models["rect"](*box))
    return np.asarray(models["embed"].compute_face_descriptor(rgb, shape))


@dataclass
class CheckResult:
    original_views: dict[str, int] = field(default_factory=dict)  # faces found per view
    defaced_views: dict[str, int] = field(default_factory=dict)
    distance: float | None = None  # front-view embedding distance, when both have a face
    refaced: bool = False  # --mode reface: a (generic) face is expected; passing means it is not the person's

    @property
    def face_found_after(self) -> list[str]:
        return [v for v, n in self.defaced_views.items() if n]

    @property
    def passed(self) -> bool:
        return not self.match if self.refaced else not self.face_found_after

    @property
    def match(self) -> bool | None:
        return None if self.distance is None else self.distance < MATCH_DISTANCE


def check_renders(original: dict[str, np.ndarray], defaced: dict[str, np.ndarray],
                  detector=detect_faces) -> CheckResult:
    """Run the detector on every view of both renders; ``detector`` is swappable for tests."""
    result = CheckResult()
    boxes = {}
    for name, pic in original.items():
        boxes[("o", name)] = detector(pic)
        result.original_views[name] = len(boxes[("o", name)])
    for name, pic in defaced.items():
        boxes[("d", name)] = detector(pic)
        result.defaced_views[name] = len(boxes[("d", name)])
    front_o, front_d = boxes.get(("o", "front")), boxes.get(("d", "front"))
    if detector is detect_faces and front_o and front_d:
        a = embedding(original["front"], front_o[0])
        b = embedding(defaced["front"], front_d[0])
        result.distance = float(np.linalg.norm(a - b))
    return result


def check_images(original: np.ndarray, original_affine: np.ndarray, defaced: np.ndarray, defaced_affine: np.ndarray,
                 detector=detect_faces, spacing: float = 1.0) -> tuple[CheckResult, dict, dict]:
    """(result, original renders, defaced renders); the defaced scan is rendered at the
    original's surface threshold so both show the same skin."""
    from deface.render import render_views

    views_o, threshold = render_views(original, original_affine, spacing=spacing)
    views_d, _ = render_views(defaced, defaced_affine, threshold=threshold, spacing=spacing)
    return check_renders(views_o, views_d, detector), views_o, views_d


def main(argv: list[str] | None = None) -> int:
    """deface-check ORIGINAL DEFACED: exit 0 when no face is found in any render of DEFACED,
    1 when one is, 2 on usage errors, 3 when the detector is not installed."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="deface-check", description="Try to find a face in surface renders of a "
                                "defaced scan (and of its original, for comparison).",
                                epilog="exit status: 0 no face found after defacing, 1 a face was found, "
                                "2 usage error, 3 detector not installed")
    p.add_argument("original")
    p.add_argument("defaced")
    p.add_argument("--png", help="write the before/after renders to this PNG")
    args = p.parse_args(argv)
    if not available():
        print("deface-check: the face detector is not installed: pip install 'deface-mri[qc]'", file=sys.stderr)
        return 3
    import nibabel as nib

    try:
        imgs = [nib.load(path) for path in (args.original, args.defaced)]
    except Exception as exc:
        print(f"deface-check: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    arrays = []
    for img in imgs:
        data = np.asanyarray(img.dataobj, dtype=np.float32)
        arrays.append(data.reshape(data.shape[:3] + (-1,))[..., 0])
    result, views_o, views_d = check_images(arrays[0], imgs[0].affine, arrays[1], imgs[1].affine)
    print("view      original  defaced")
    for view in result.original_views:
        print(f"{view:<9} {result.original_views[view]:>8}  {result.defaced_views[view]:>7}")
    if result.distance is not None:
        print(f"front-view embedding distance {result.distance:.3f}: "
              f"{'MATCH' if result.match else 'no match'} (threshold {MATCH_DISTANCE})")
    if args.png:
        from deface.qc import render_grid_png

        render_grid_png(views_o, views_d, args.png, title=f"{args.defaced}")
    if result.passed:
        print("PASS: no face found in any render of the defaced scan")
        return 0
    print(f"FAIL: a face was found in the defaced scan's views: {', '.join(result.face_found_after)}")
    return 1
