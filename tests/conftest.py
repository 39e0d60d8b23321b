"""Shared fixtures: a synthetic phantom head and a Defacer with a tiny random network."""

from __future__ import annotations

import numpy as np
import nibabel as nib
import pytest
import torch

from deface import BRAIN, FACE
from deface.network import TINY_ARCHITECTURE, build_network

# Phantom anatomy in world mm (RAS): head ellipsoid, brain inside, nose and eyes in front.
HEAD_RADII = np.array([70.0, 90.0, 80.0])
BRAIN_CENTRE, BRAIN_RADII = np.array([0.0, -5.0, 20.0]), np.array([55.0, 70.0, 50.0])
NOSE_CENTRE, NOSE_RADII = np.array([0.0, 92.0, -20.0]), np.array([12.0, 18.0, 25.0])
FACE_Y = 55.0  # face tissue: head voxels in front of this plane and below z = 10


def inside(points: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return (((points - centre) / radii) ** 2).sum(-1) <= 1.0


def phantom_truth(points: np.ndarray) -> np.ndarray:
    """Label (0/1/2) of world points for the phantom head."""
    head = inside(points, np.zeros(3), HEAD_RADII) | inside(points, NOSE_CENTRE, NOSE_RADII)
    brain = inside(points, BRAIN_CENTRE, BRAIN_RADII)
    face = head & ~brain & (points[..., 1] > FACE_Y) & (points[..., 2] < 10)
    labels = np.zeros(points.shape[:-1], np.uint8)
    labels[face] = FACE
    labels[brain] = BRAIN
    return labels


def phantom_intensity(points: np.ndarray) -> np.ndarray:
    labels = phantom_truth(points)
    head = inside(points, np.zeros(3), HEAD_RADII) | inside(points, NOSE_CENTRE, NOSE_RADII)
    img = np.where(head, 300.0, 0.0)
    img = np.where(labels == BRAIN, 600.0, img)
    eyes = inside(points, np.array([30.0, 68.0, -5.0]), np.full(3, 10.0)) | inside(points, np.array([-30.0, 68.0, -5.0]), np.full(3, 10.0))
    return np.where(eyes, 120.0, img)


def world_points(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def oblique_affine(shape: tuple[int, int, int], zooms: tuple[float, float, float], angle_deg: float = 0.0) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(zooms)
    affine[:3, 3] = -(affine[:3, :3] @ ((np.array(shape) - 1) / 2.0))
    return affine


def make_phantom(shape=(50, 62, 56), zooms=(4.0, 3.5, 3.8), angle_deg=0.0, dtype=np.int16,
                 slope: float | None = None) -> nib.Nifti1Image:
    """A non-cubic phantom head NIfTI (world-centred), optionally oblique and scaled."""
    affine = oblique_affine(shape, zooms, angle_deg)
    data = phantom_intensity(world_points(shape, affine))
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    img = nib.Nifti1Image(data.astype(dtype), affine, hdr)
    img.header["descrip"] = b"phantom"
    img.set_qform(affine, 1)
    img.set_sform(affine, 2)
    if slope is not None:
        img.header.set_slope_inter(slope, 5.0)
    return img


def oracle_probs(defacer, canon) -> torch.Tensor:
    """Probabilities on the canonical grid from the phantom's true anatomy (an ideal network)."""
    labels = phantom_truth(world_points(canon.grid.shape, canon.grid.affine))
    probs = np.zeros((3,) + labels.shape, np.float32)
    for c in range(3):
        probs[c] = labels == c
    return torch.from_numpy(probs)


@pytest.fixture
def tiny_metadata() -> dict:
    # The atlas guard is off for the phantom (an ellipsoid is no head the atlas can be registered
    # to); tests/test_atlas.py checks the guard on a real head.
    return {"architecture": TINY_ARCHITECTURE, "preprocessing": {"spacing_mm": 4.0, "multiple": 4},
            "postprocessing": {"brain_margin_mm": 4.0, "min_face_ml": 1.0, "atlas": False}}


@pytest.fixture
def defacer(tiny_metadata):
    from deface.inference import Defacer

    torch.manual_seed(0)
    return Defacer(network=build_network(TINY_ARCHITECTURE), metadata=tiny_metadata, device="cpu")


@pytest.fixture
def tiny_weights(tmp_path_factory, tiny_metadata):
    """A weights folder holding a tiny random network, exported like the real ones."""
    import torch

    from deface.network import build_network
    from deface.weights import export_weights

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("weights")
    export_weights(build_network(tiny_metadata["architecture"]).state_dict(), tiny_metadata, out, "deface_tiny")
    return out
