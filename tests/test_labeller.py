"""deface-label on a head whose anatomy is known: the shipped BrainWeb atlas head resampled onto
an oblique, non-cubic grid. The registration must undo the rotation and shift, and the labels
must put the brain where the atlas brain is and the face in front of and below it, never in it."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from deface.atlas import Atlas
from deface.data.labeller import main as label_main
from deface.preprocessing import Grid, resample
from tests.conftest import oblique_affine


@pytest.mark.slow  # registration from a far pose: ~20-40 s on 2 cores
def test_labeller_recovers_an_oblique_head(tmp_path):
    atlas = Atlas.load()
    shape = (72, 84, 80)
    affine = oblique_affine(shape, (2.5, 2.3, 2.4), angle_deg=20.0)
    affine[:3, 3] += np.array([4.0, -12.0, 10.0])  # the atlas head's centre is not at the origin
    grid = Grid(shape, affine)
    image = resample(torch.from_numpy(atlas.image)[None], atlas.affine, grid)[0].numpy()
    truth = resample(torch.from_numpy(atlas.brain)[None], atlas.affine, grid)[0].numpy() >= 0.5
    src = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image((image * 1000).astype(np.int16), affine), str(src))

    assert label_main([str(src), "-o", str(tmp_path / "out"), "--template", "brainweb",
                       "--data-root", str(tmp_path / "nowhere")]) == 0
    out = nib.load(str(tmp_path / "out" / "head_labels.nii.gz"))
    assert out.shape == shape and np.allclose(out.affine, affine)
    assert (tmp_path / "out" / "head_labels.png").exists()
    labels = np.asarray(out.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2}
    brain, face = labels == 2, labels == 1
    assert 2 * (brain & truth).sum() / (brain.sum() + truth.sum()) > 0.9
    assert not (face & truth).any()
    assert face.sum() * np.abs(np.linalg.det(affine[:3, :3])) / 1000 > 20  # mL of face tissue
    world = lambda m: affine[:3, :3] @ np.argwhere(m).mean(0) + affine[:3, 3]  # noqa: E731
    d = world(face) - world(brain)
    assert d[1] > 30 and d[2] < 0  # the face lies in front of and below the brain


def test_brain_refinement_undoes_a_pitched_start():
    """The outline of a round skull leaves pitch loose: started 10 degrees pitched, the brain
    refinement must bring the template most of the way back (here the truth is the identity)."""
    from scipy.spatial.transform import Rotation

    from deface.atlas import Head, refine_on_brain

    atlas = Atlas.load()
    head = Head(atlas.image, atlas.affine)
    centre = atlas.affine[:3, :3] @ (np.array(atlas.image.shape) / 2.0) + atlas.affine[:3, 3]
    pitched = np.eye(4)
    pitched[:3, :3] = Rotation.from_euler("x", 10, degrees=True).as_matrix()
    pitched[:3, 3] = centre - pitched[:3, :3] @ centre
    refined = refine_on_brain(head, Head(atlas.image, atlas.affine), pitched, (atlas.brain, atlas.affine))
    u, _, vt = np.linalg.svd(refined[:3, :3])
    angle = np.degrees(Rotation.from_matrix(u @ vt).magnitude())
    assert angle < 4.0


def test_missing_data_folder_is_one_line(tmp_path, capsys):
    from deface.data.labeller import main

    assert main([str(tmp_path / "x.nii.gz"), "-o", str(tmp_path / "out"), "--data-root", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data-root" in err and not (tmp_path / "out").exists()


@pytest.mark.slow  # registration from a far pose: ~20-40 s on 2 cores
def test_second_opinion_replaces_a_labelling_registration_that_fits_worse():
    """A labelling transform 25 mm off gives way to the wrapper's registration of the same head."""
    from deface.atlas import Head
    from deface.data.labeller import better_fit
    from deface.preprocessing import to_canonical

    atlas = Atlas.load()
    shape = (72, 84, 80)
    affine = oblique_affine(shape, (2.5, 2.3, 2.4), angle_deg=15.0)
    grid = Grid(shape, affine)
    image = resample(torch.from_numpy(atlas.image)[None], atlas.affine, grid)[0].numpy()
    canon = to_canonical(image, affine)
    fixed = Head(canon.image[0].numpy(), canon.grid.affine)
    off = np.eye(4)
    off[2, 3] = 25.0  # the labelling registration put the brain 25 mm too low
    chosen = better_fit(image, affine, fixed, off)
    assert not np.allclose(chosen, off)
    centre = np.append(affine[:3, :3] @ (np.array(shape) / 2) + affine[:3, 3], 1.0)
    assert np.linalg.norm(chosen @ centre - centre) < 5.0  # the head is already in atlas space
    assert np.allclose(better_fit(image, affine, fixed, chosen), chosen, atol=1e-3)  # a good fit stays
