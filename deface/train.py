"""``deface-train``: train the U-Net from Hydra configs (configs/train.yaml) and export weights.

Examples:
  deface-train                                  # defaults: CPU, unet_base, synthetic + real heads
  deface-train experiment=v1_gpu                # the recipe of the shipped v1 weights
  deface-train experiment=finetune data.train='[real_myscanner_*]'
  deface-train debug=fdr                        # one batch through train and validation
  deface-train ckpt_path=logs/.../last.ckpt     # resume
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
log = logging.getLogger("deface.train")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


def build_metadata(cfg: DictConfig, metrics: dict, wall_s: float) -> dict:
    """The metadata written beside exported weights: everything inference needs, and provenance."""
    import monai
    import torch

    from deface import CLASS_NAMES, __version__

    return {
        "name": cfg.export.name,
        "version": cfg.export.version,
        "deface_version": __version__,
        "architecture": OmegaConf.to_container(cfg.model.net, resolve=True),
        "preprocessing": {"orientation": "RAS", "spacing_mm": cfg.data.synth.spacing, "multiple": 16,
                          "input_shape": list(cfg.data.synth.patch),
                          "intensity": "percentile 0.5-99.5 -> 0-1 over the field of view"},
        "classes": list(CLASS_NAMES),
        "postprocessing": dict(OmegaConf.to_container(cfg.export.postprocessing, resolve=True)),
        "training": {
            "data": OmegaConf.to_container(cfg.data, resolve=True),
            "trainer": OmegaConf.to_container(cfg.trainer, resolve=True),
            "seed": cfg.seed, "wall_time_s": round(wall_s, 1), "hardware": hardware(),
        },
        "metrics": metrics,
        "torch_version": torch.__version__,
        "monai_version": monai.__version__,
        "git_commit": git_commit(),
        "intended_use": "Removing facial features from head MRI (any contrast) before sharing; not for diagnosis.",
        "license": "Apache-2.0 (weights); training data licences in weights/MODEL_CARD.md",
    }


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def train(cfg: DictConfig) -> dict:
    import lightning as L

    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    logger = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=logger or False)
    start = time.time()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    wall = time.time() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("metrics: %s", json.dumps(metrics))
    if cfg.export.get("dir") and trainer.is_global_zero and not cfg.trainer.get("fast_dev_run"):
        from deface.weights import export_weights

        meta = build_metadata(cfg, metrics, wall)
        path = export_weights(model.net.state_dict(), meta, Path(cfg.export.dir), cfg.export.name)
        log.info("exported weights: %s", path)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train.yaml")
def main(cfg: DictConfig) -> None:
    train(cfg)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
