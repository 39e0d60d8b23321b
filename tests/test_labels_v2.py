"""The label check, real-head contrast synthesis, face cuts, the attack's surface score and the
cache's selection of plausible, non-held-out heads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deface import BRAIN, FACE
from deface.data.label_check import check_labels
from deface.data.synthesis import Grid, SynthConfig, face_cut, random_classes, synthesize
from tests.conftest import make_phantom, phantom_truth, world_points
from tests.test_data import phantom_subject, write_tiny_cache


def head_labels(shape=(90, 110, 100), spacing=2.0) -> tuple[np.ndarray, np.ndarray]:
    """A plausible label map on a 2 mm RAS grid: a 1.2 L brain, a face in front of and below it."""
    affine = np.diag([spacing] * 3 + [1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2.0 * spacing
    pts = world_points(shape, affine)
    brain = (((pts - [0, 0, 20]) / [65, 80, 55]) ** 2).sum(-1) <= 1
    face = (np.abs(pts[..., 0]) < 50) & (pts[..., 1] > 84) & (pts[..., 1] < 105) & (pts[..., 2] < 0) & (pts[..., 2] > -80)
    labels = np.zeros(shape, np.uint8)
    labels[face] = FACE
    labels[brain] = BRAIN
    return labels, affine


def test_label_check_passes_a_head_and_flags_implausible_labels():
    labels, affine = head_labels()
    assert check_labels(labels, affine) == []
    behind = labels.copy()
    behind[labels == FACE] = 0
    behind[:, :20][(labels[:, :20] == 0)] = FACE  # "face" at the back of the head
    assert any("in front" in f for f in check_labels(behind, affine))
    small = np.where(labels == BRAIN, 0, labels).astype(np.uint8)
    small[40:45, 50:55, 60:65] = BRAIN
    assert any(f.startswith("brain") for f in check_labels(small, affine))
    touching = labels.copy()
    edge = np.argwhere(labels == BRAIN)
    front = edge[np.argmax(edge[:, 1])]
    touching[tuple(front + [0, 1, 0])] = FACE
    assert check_labels(touching, affine) == []  # one stray voxel is resampling, not a bad label
    touching[np.roll(labels == BRAIN, 3, axis=1) & (labels == 0)] = FACE
    assert any("within" in f for f in check_labels(touching, affine))


def test_random_classes_gives_each_intensity_cluster_one_random_level():
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(20, 20, 20)
    x[5:15, 5:15, 5:15] = torch.linspace(0.2, 1.0, 10)[:, None, None]
    out = random_classes(x, np.random.default_rng(1), gen)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert out[x == 0].abs().max() == 0  # air stays dark
    levels = {round(float(v), 1) for v in out[5:15, 5:15, 5:15].mean((1, 2))}
    assert 2 <= len(levels) <= 8


def test_face_cut_cuts_along_the_patch_axis_nearest_superior():
    labels = torch.zeros(30, 32, 34, dtype=torch.long)
    labels[10:20, 20:30, 4:20] = FACE
    affine = np.eye(4)
    affine[:3, :3] = np.array([[0, 0, 2.0], [2.0, 0, 0], [0, 2.0, 0]])  # patch axis 1 runs superior
    seen = set()
    for seed in range(12):
        keep = face_cut(labels, Grid((30, 32, 34), affine), np.random.default_rng(seed))
        varies = [a for a in range(3) if not torch.equal(keep, keep.narrow(a, 0, 1).expand_as(keep))]
        assert len(varies) == 1 and varies[0] in (0, 1)  # one plane: from below (axis 1) or in front (axis 0)
        axis = varies[0]
        face_kept = ((labels == FACE) & keep).sum() / (labels == FACE).sum()
        assert 0 < face_kept < 1  # through the face, not beside it
        profile = keep.float().mean(tuple(b for b in range(3) if b != axis))
        if axis == 1:
            assert profile[-1] == 1 and profile[0] == 0  # the superior part stays
        else:
            assert profile[0] == 1 and profile[-1] == 0  # the posterior part stays
        seen.add(axis)
    assert seen == {0, 1}
    assert face_cut(torch.zeros_like(labels), Grid((30, 32, 34), affine), np.random.default_rng(0)) is None


def test_synthesis_with_real_classes_and_face_cuts_keeps_classes():
    cfg = SynthConfig(patch=(32, 40, 36), p_real_classes=1.0, p_face_cut=1.0, max_small_rotation_deg=45.0)
    for seed in range(3):
        image, labels = synthesize(phantom_subject("image"), cfg, np.random.default_rng(seed))
        assert image.shape == (1, 32, 40, 36) and torch.isfinite(image).all()
        assert set(labels.unique().tolist()) <= {0, 1, 2}


def test_select_leaves_out_flagged_and_held_out_heads(tmp_path):
    from deface.data.datamodule import select

    write_tiny_cache(tmp_path / "cache")
    (tmp_path / "cache" / "index.json").write_text(json.dumps({"real_t2": {"flags": ["brain 10 mL outside"]}}))
    chosen = [f.stem for f in select(tmp_path / "cache", ["brainweb_*", "real_*"], ["real_t3"])]
    assert chosen == ["brainweb_t0", "brainweb_t1"]


def test_face_surface_kept_is_one_untouched_and_low_without_the_face():
    from deface.attack import face_surface_kept

    img = make_phantom(shape=(60, 70, 64), zooms=(3.0, 3.0, 3.0), angle_deg=15.0)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    labels = phantom_truth(world_points(img.shape, img.affine))
    same, _ = face_surface_kept(data, data, img.affine, labels, spacing=2.0)
    assert same == pytest.approx(1.0)
    defaced = np.where(labels == FACE, 0, data)
    gone, _ = face_surface_kept(data, defaced, img.affine, labels, spacing=2.0)
    assert gone < 0.2


def test_gallery_rank1_counts_only_the_nearest_original():
    from deface.attack import AttackResult, gallery_rank1

    e = {n: np.eye(3)[i] for i, n in enumerate("abc")}
    results = {n: AttackResult(0.0, ["front"], {"front": 0.1}, {"front": 0.1}, {"front": e[n]},
                               {"front": e[n] * 0.9 if n != "c" else e["a"]}) for n in "abc"}
    hits = gallery_rank1(results)
    assert hits == {"a": ["front"], "b": ["front"], "c": []}
    results["b"].distance = {}  # no face detected in b's defaced render: only the forced attack counts it
    assert gallery_rank1(results)["b"] == [] and gallery_rank1(results, forced=True)["b"] == ["front"]
