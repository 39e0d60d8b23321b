"""Evaluation helpers: metrics on known masks, the 48 axis orders keep world space."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from deface import BRAIN, FACE
from deface.evaluation import CONTRASTS, axis_codes, contrast_variant, dice, hd95, reorient, score_head, undo_reorient
from tests.conftest import make_phantom, phantom_truth, world_points


def test_dice_and_hd95_on_known_masks():
    a = np.zeros((20, 20, 20), bool)
    a[5:10, 5:10, 5:10] = True
    b = np.roll(a, 2, axis=0)
    assert dice(a, a) == 1.0 and dice(a, b) == pytest.approx(0.6)
    assert hd95(a, b, np.array([1.5, 1.0, 1.0])) == pytest.approx(3.0)
    assert np.isnan(dice(np.zeros_like(a), np.zeros_like(a)))


def test_48_axis_orders_are_the_same_head_in_world_space():
    img = make_phantom(shape=(10, 12, 14))
    data = np.asanyarray(img.dataobj)
    codes = set()
    for perm, flips in axis_codes():
        moved, aff = reorient(data, img.affine, perm, flips)
        codes.add(nib.aff2axcodes(aff))
        idx = np.array([3, 5, 7])
        world = img.affine[:3, :3] @ idx + img.affine[:3, 3]
        new_idx = np.round(np.linalg.inv(aff) @ np.append(world, 1))[:3].astype(int)
        assert moved[tuple(new_idx)] == data[tuple(idx)]
        assert np.array_equal(undo_reorient(moved, perm, flips), data)
    assert len(codes) == 48


@pytest.mark.parametrize("kind", CONTRASTS)
def test_contrast_variants_keep_air_dark(kind):
    img = make_phantom()
    data = np.asanyarray(img.dataobj).astype(np.float32)
    labels = phantom_truth(world_points(img.shape, img.affine))
    out = contrast_variant(data, labels, kind)
    assert out.shape == data.shape and out.dtype == np.float32
    assert out[data == 0].max() == 0 and out[labels == BRAIN].min() > 0


def test_score_head_counts_brain_voxels_and_recall(defacer):
    img = make_phantom()
    labels = phantom_truth(world_points(img.shape, img.affine))
    score = score_head(defacer, "phantom", img, labels)
    assert score.brain_changed == 0  # the random network is kept off the brain by the margin
    assert 0.0 <= score.recall_face <= 1.0 and score.seconds > 0
    assert (labels == FACE).any()
