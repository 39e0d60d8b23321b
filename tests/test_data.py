"""Labels, synthesis and a fast dev run of training on tiny data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deface import BRAIN, FACE
from deface.data.cache import UNIT_SCALE
from deface.data.labels import compose_labels, face_region_mni
from deface.data.synthesis import Subject, SynthConfig, source_box, synthesize


def test_face_region_covers_nose_lips_chin_not_brain_or_ears():
    pts = np.array([[0, 95, -20], [0, 85, -60], [0, 75, -95], [30, 60, -15],  # nose, lips, chin, eye
                    [0, 20, 40], [0, -40, 10], [70, -20, -30], [0, 60, 60]], float)  # brain, back, ear, forehead top
    assert face_region_mni(pts).tolist() == [True] * 4 + [False] * 4


def phantom_subject(kind: str) -> Subject:
    """A tiny head on a 2 mm RAS grid (non-cubic): brain ellipsoid, face slab in front."""
    shape = (60, 72, 66)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -np.array(shape) + 1.0
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1) * 2.0 + affine[:3, 3]
    head = ((idx / [55, 68, 62]) ** 2).sum(-1) <= 1
    brain = (((idx - [0, -5, 15]) / [42, 52, 40]) ** 2).sum(-1) <= 1
    labels = compose_labels(head, brain, np.eye(4) + np.diag([0, 0, 0, 0]), affine)
    # Shift the MNI frame so the phantom's front counts as face.
    labels[(idx[..., 1] > 45) & head & ~brain & (idx[..., 2] < 10)] = FACE
    tissue = np.where(brain, 3, np.where(head, 5, 0)).astype(np.uint8)
    if kind == "tissue":
        return Subject("phantom", torch.from_numpy(labels), affine, tissue=torch.from_numpy(tissue))
    return Subject("phantom", torch.from_numpy(labels), affine, image=torch.from_numpy(tissue / 5.0).float())


@pytest.mark.parametrize("seed", range(3))
def test_sampling_the_reached_box_equals_sampling_the_whole_source(seed):
    """Training reads only the box its patch reaches: the same values, border and outside included."""
    gen = torch.Generator().manual_seed(seed)
    source = torch.rand((23, 31, 17), generator=gen)
    centre = torch.rand(3, generator=gen) * 2.4 - 1.2  # partly outside the source
    coords = (centre + 0.5 * (torch.rand((1, 9, 8, 7, 3), generator=gen) - 0.5)).float()
    box, scaled = source_box(coords, tuple(source.shape))
    for mode in ("bilinear", "nearest"):
        whole = torch.nn.functional.grid_sample(source[None, None], coords, mode=mode, align_corners=True)
        boxed = torch.nn.functional.grid_sample(source[box][None, None], scaled, mode=mode, align_corners=True)
        assert torch.allclose(whole, boxed, atol=1e-5)
    assert all(b.stop - b.start < n for b, n in zip(box, source.shape))


def test_cached_uint8_image_is_sampled_as_its_float_values():
    float_subject = phantom_subject("image")
    scale = UNIT_SCALE
    stored = torch.round(float_subject.image / scale).to(torch.uint8)
    uint8_subject = Subject("phantom", float_subject.labels, float_subject.affine, image=stored, image_scale=scale)
    cfg = SynthConfig(patch=(32, 40, 40))
    a = synthesize(float_subject, cfg, np.random.default_rng(1))
    b = synthesize(uint8_subject, cfg, np.random.default_rng(1))
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], atol=0.05)


def test_compose_labels_keeps_gap_to_brain():
    s = phantom_subject("tissue")
    assert (s.labels == FACE).any() and (s.labels == BRAIN).any()


@pytest.mark.parametrize("seed", range(4))
def test_spatial_augmentation_keeps_image_and_labels_aligned(seed):
    """With intensity effects off, brain voxels stay brighter than face voxels after any warp."""
    cfg = SynthConfig(patch=(48, 56, 56), p_thick_slices=0, max_bias=0, max_noise=0, p_crop=0,
                      p_skull_stripped=0, p_defaced=0, p_random_contrast=0, p_inversion=0,
                      p_large_rotation=0.5, p_axis_permutation=0.5,
                      presets={"fixed": [0.0, 0, 0, 1.0, 0, 0.4, 0, 0, 0, 0, 0, 0]})
    image, labels = synthesize(phantom_subject("tissue"), cfg, np.random.default_rng(seed))
    brain = labels == BRAIN
    er = -torch.nn.functional.max_pool3d(-brain.float()[None, None], 5, 1, 2)[0, 0] > 0
    if er.sum() > 50:
        assert image[0][er].mean() > 0.8
    outside = labels == 0
    assert image[0][outside].mean() < image[0][er].mean() if er.any() else True


def test_synthesis_shapes_and_classes():
    for kind in ("tissue", "image"):
        image, labels = synthesize(phantom_subject(kind), SynthConfig(patch=(32, 40, 36)), np.random.default_rng(0))
        assert image.shape == (1, 32, 40, 36) and labels.shape == (32, 40, 36)
        assert set(labels.unique().tolist()) <= {0, 1, 2} and torch.isfinite(image).all()


def write_tiny_cache(folder):
    folder.mkdir()
    for i, kind in enumerate(["tissue", "tissue", "image", "image"]):
        s = phantom_subject(kind)
        arrays = {"labels": s.labels.numpy(), "affine": s.affine}
        if kind == "tissue":
            arrays["tissue"] = s.tissue.numpy()
            name = f"brainweb_t{i}"
        else:
            arrays["image"] = (s.image.numpy() / 1.5 * 255).astype(np.uint8)
            name = f"real_t{i}"
        np.savez_compressed(folder / f"{name}.npz", **arrays)


def test_train_fast_dev_run(tmp_path):
    from hydra import compose, initialize_config_dir

    from deface.train import CONFIG_DIR, train

    write_tiny_cache(tmp_path / "cache")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train.yaml", overrides=[
            "debug=fdr", "model=unet_tiny", f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path}",
            "data.train=[brainweb_t0,brainweb_t1,real_t2]", "data.val=[real_t3]", "data.synth.patch=[32,32,32]"])
        metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"])


@pytest.mark.slow
def test_finetune_from_exported_weights(tmp_path):
    """Train briefly, export, then fine-tune from the export (the lab workflow in the README)."""
    from hydra import compose, initialize_config_dir

    from deface.train import CONFIG_DIR, train
    from deface.weights import load_state_dict

    write_tiny_cache(tmp_path / "cache")
    common = ["model=unet_tiny", f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path}",
              "data.train=[brainweb_t0,brainweb_t1,real_t2]", "data.val=[real_t3]", "data.synth.patch=[32,32,32]",
              "data.num_workers=0", "data.samples_per_epoch=4", "data.batch_size=2", "trainer.max_epochs=2",
              "logger=none", "callbacks=none"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        train(compose("train.yaml", overrides=common + [f"export.dir={tmp_path / 'w1'}", "export.name=deface_a"]))
        train(compose("train.yaml", overrides=common + ["experiment=finetune", f"model.init_weights={tmp_path / 'w1'}",
                                                        "model=unet_tiny", f"export.dir={tmp_path / 'w2'}"]))
    state, meta = load_state_dict(tmp_path / "w2")
    assert meta["name"] == "deface_unet_finetuned" and state


@pytest.mark.slow  # 45 s on 2 cores; test_predict_ddp keeps a two-process run in the default set
def test_ddp_training_with_two_cpu_processes(tmp_path):
    """trainer=ddp on 2 CPU processes (gloo): one fast-dev-run step through DDP."""
    import os
    import subprocess
    import sys

    write_tiny_cache(tmp_path / "cache")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "deface.train", "debug=fdr", "model=unet_tiny", "trainer=ddp", "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.sync_batchnorm=false", f"paths.cache_dir={tmp_path / 'cache'}",
           f"paths.output_dir={tmp_path}", f"paths.log_dir={tmp_path / 'logs'}",
           "data.train=[brainweb_t0,brainweb_t1,real_t2]", "data.val=[real_t3]", "data.synth.patch=[32,32,32]"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size: 2" in proc.stderr or "MEMBER: 2/2" in proc.stderr, proc.stderr[-3000:]


def test_label_check_flags_a_brain_label_an_extractor_disagrees_with():
    from deface.data.label_check import check_against

    labels = np.zeros((40, 40, 40), np.uint8)
    labels[8:32, 8:32, 10:34] = 2
    extractor = labels == 2
    extractor[8:10] = False  # a brain label with its CSF rim is a little larger: no flag
    assert check_against(labels, extractor) == []
    shifted = np.roll(labels == 2, 9, axis=1)  # a registration that put the brain into the orbits
    assert "Dice" in check_against(labels, shifted)[0]


@pytest.mark.parametrize("patch", [(16, 16, 16), (64, 64, 64)])
def test_validation_sees_a_head_as_the_wrapper_does(tiny_metadata, patch):
    """The training curve's Dice is the wrapper's: validation runs the network through
    ``network.probabilities``, as ``Defacer.predict`` does, with the training patch as the window
    (16: the phantom's grid is larger, through ``head_frame``; 64: smaller, seen whole, not padded)."""
    from deface.inference import Defacer
    from deface.lit_module import DefaceLitModule, dice_and_recall
    from deface.network import TINY_ARCHITECTURE, build_network
    from deface.preprocessing import to_canonical
    from tests.conftest import make_phantom, phantom_truth, world_points

    torch.manual_seed(0)
    net = build_network(TINY_ARCHITECTURE, monai=True)
    img = make_phantom()
    canon = to_canonical(np.asarray(img.dataobj, np.float32), img.affine, 4.0, 4)
    assert any(n > p for n, p in zip(canon.image.shape[1:], patch)) == (patch[0] == 16)
    labels = torch.from_numpy(phantom_truth(world_points(canon.grid.shape, canon.grid.affine))).long()
    module = DefaceLitModule(net, roi_size=patch, spacing=4.0).eval()
    logged = {}
    module.log_dict = lambda metrics, **_: logged.update(metrics)
    module.validation_step({"image": canon.image[None], "labels": labels[None]}, 0)
    meta = dict(tiny_metadata, preprocessing={"spacing_mm": 4.0, "multiple": 4, "input_shape": list(patch)})
    pred = Defacer(network=net, metadata=meta, device="cpu").predict([canon])[0].argmax(0)
    for name, cls in (("face", FACE), ("brain", BRAIN)):
        assert logged[f"val/dice_{name}"] == pytest.approx(dice_and_recall(pred, labels, cls)[0], abs=1e-9)
