"""The shipped weights on real anatomy: a face is found in a head, nothing is removed from a
non-head or a brain-only image (the catalogue's warn cases), and every run is deterministic."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from deface import cli
from deface.cli import EXAMPLE_HEAD

SHARED_HEADS = Path(os.environ.get("DEFACE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "heads"


@pytest.fixture(scope="module")
def shipped():
    from deface.inference import Defacer

    return Defacer(device="cpu")


@pytest.fixture(scope="module")
def example_result(shipped):
    """The example head defaced once, shared by the tests that only read the result."""
    return shipped.deface(EXAMPLE_HEAD)


def test_example_head_loses_its_face(example_result):
    result = example_result
    assert result.stats["face_found"] and not result.stats["brain_only"]
    assert result.stats["removed_ml"] > 100


def test_same_input_twice_gives_the_same_mask(shipped, example_result):
    a, b = example_result, shipped.deface(EXAMPLE_HEAD)
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.raw, b.raw)


def test_non_head_image_is_left_alone(tmp_path, caplog):
    ex = nib.load(str(EXAMPLE_HEAD))
    noise = np.random.default_rng(0).normal(100, 20, (80, 90, 80)).astype(np.float32)
    path = tmp_path / "noise.nii.gz"
    nib.save(nib.Nifti1Image(noise, ex.affine), str(path))
    with caplog.at_level(logging.WARNING, logger="deface"):
        # without the atlas guard nothing but the network can keep the noise from being defaced (and the
        # registration of a noise cube takes a minute)
        assert cli.main([str(path), "-o", str(tmp_path / "out"), "--device", "cpu", "--no-atlas-guard"]) == 0
    out = nib.load(str(tmp_path / "out" / "noise_defaced.nii.gz"))
    assert np.array_equal(np.asanyarray(out.dataobj), noise)
    assert any("no face found" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not (SHARED_HEADS / "colin27_t1_brain.nii.gz").exists(), reason="needs ../shared/data/heads")
def test_brain_extracted_head_comes_out_untouched(tmp_path, caplog):
    src = SHARED_HEADS / "colin27_t1_brain.nii.gz"
    with caplog.at_level(logging.WARNING, logger="deface"):
        assert cli.main([str(src), "-o", str(tmp_path), "--device", "cpu"]) == 0
    before = np.asanyarray(nib.load(str(src)).dataobj)
    after = np.asanyarray(nib.load(str(tmp_path / "colin27_t1_brain_defaced.nii.gz")).dataobj)
    assert np.array_equal(before, after)
    assert any("brain-only" in r.getMessage() for r in caplog.records)


@pytest.mark.gpu
def test_cpu_and_cuda_masks_agree(shipped):
    import torch

    from deface.evaluation import dice
    from deface.inference import Defacer

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    cpu = shipped.deface(EXAMPLE_HEAD).mask
    gpu = Defacer(device="cuda").deface(EXAMPLE_HEAD).mask
    assert dice(cpu, gpu) >= 0.999
