"""Weights are hash-checked and weights_only; every Hydra config composes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deface.network import TINY_ARCHITECTURE, build_network
from deface.weights import WeightsError, export_weights, load_state_dict, read_metadata

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_export_and_load_roundtrip(tmp_path):
    net = build_network(TINY_ARCHITECTURE)
    export_weights(net.state_dict(), {"architecture": TINY_ARCHITECTURE}, tmp_path, "deface_t")
    state, meta = load_state_dict(tmp_path)
    assert meta["file"].startswith("deface_t-") and meta["sha256"][:8] in meta["file"]
    assert (tmp_path / "SHA256SUMS").read_text().split()[0] == meta["sha256"]
    build_network(meta["architecture"]).load_state_dict(state)


def test_corrupted_weights_refused_naming_both_hashes(tmp_path):
    net = build_network(TINY_ARCHITECTURE)
    export_weights(net.state_dict(), {"architecture": TINY_ARCHITECTURE}, tmp_path, "deface_t")
    meta, _ = read_metadata(tmp_path)
    path = tmp_path / meta["file"]
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=meta["sha256"]):
        load_state_dict(tmp_path)


def test_network_target_allowlist():
    with pytest.raises(ValueError):
        build_network({"_target_": "os.system", "command": "true"})


def test_shipped_weights_load_and_match_metadata():
    state, meta = load_state_dict(None)
    net = build_network(meta["architecture"])
    net.load_state_dict(state)
    assert meta["classes"] == ["background", "face", "brain"]
    with torch.inference_mode():
        assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def all_overrides() -> list[list[str]]:
    combos = [[]]
    for group in ("data", "model", "trainer", "callbacks", "logger", "experiment", "debug"):
        for f in sorted((CONFIGS / group).glob("*.yaml")):
            combos.append([f"{group}={f.stem}"])
    return combos


@pytest.mark.parametrize("overrides", all_overrides(), ids=lambda o: ",".join(o) or "default")
def test_every_config_composes(overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train.yaml", overrides=overrides, return_hydra_config=True)
        OmegaConf.resolve(cfg.model)
        assert cfg.model.net._target_.startswith("monai.networks.nets.")
        assert cfg.data._target_ and cfg.trainer._target_
        build_network(OmegaConf.to_container(cfg.model.net))


def test_train_help_says_what_it_does_and_that_the_cache_comes_first():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "deface.train", "--help"], capture_output=True, text=True)
    first = out.stdout.splitlines()[:2]
    assert out.returncode == 0 and first[0].startswith("deface-train: train") and "cache" in first[1]


def test_metadata_with_an_unknown_key_is_refused(tmp_path, tiny_weights):
    import json

    from deface.inference import Defacer
    from deface.weights import WeightsError

    meta_path = next(tiny_weights.glob("*.json"))
    for change in ({"postprocesing": {"atlas": False}}, {"preprocessing": {"spacing_mm": 4.0, "spacingmm": 3.0}}):
        folder = tmp_path / next(iter(change))
        folder.mkdir()
        for f in tiny_weights.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        meta = json.loads(meta_path.read_text())
        meta.update(change)
        (folder / meta_path.name).write_text(json.dumps(meta))
        with pytest.raises(WeightsError, match="unknown key"):
            Defacer(weights=folder, device="cpu")
    Defacer(weights=tiny_weights, device="cpu")  # the unchanged metadata loads
