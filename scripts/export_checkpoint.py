"""Export a Lightning checkpoint of a training run as shippable weights (+ metadata, SHA256SUMS).

    python scripts/export_checkpoint.py logs/v1_1_cpu/runs/<date> --ckpt best -o weights \
        --name deface_unet_v1_1 --version 1.1.0

``best`` is the checkpoint with the highest validation face Dice (the ModelCheckpoint's pick),
``last`` the last one, or give a file name. The run's Hydra config supplies architecture,
preprocessing and training settings; the validation metrics of the checkpoint's epoch come
from the run's CSV log; wall time is the span of that log.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf


def pick_checkpoint(run: Path, which: str) -> Path:
    folder = run / "checkpoints"
    if which == "last":
        return folder / "last.ckpt"
    if which == "best":
        state = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)
        for key, value in state.get("callbacks", {}).items():
            if key.startswith("ModelCheckpoint") and value.get("monitor") and value.get("best_model_path"):
                return folder / Path(value["best_model_path"]).name
        raise SystemExit("no best checkpoint recorded; use --ckpt last or a file name")
    return folder / which


def epoch_metrics(run: Path, epoch: int) -> dict[str, float]:
    rows = list(csv.DictReader(next(run.glob("csv/*/metrics.csv")).open()))
    out = {}
    for row in rows:
        if row.get("epoch") and int(row["epoch"]) == epoch:
            out.update({k: float(v) for k, v in row.items() if v and k.startswith("val/")})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a training run folder (holds .hydra/, checkpoints/, csv/)")
    p.add_argument("--ckpt", default="best")
    p.add_argument("-o", "--out", type=Path, default=Path("weights"))
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--wall-time", type=float, default=None, help="training seconds (default: from the log)")
    p.add_argument("--note", default=None, help="a line on how the run was made, stored in the metadata")
    args = p.parse_args()

    from deface.train import build_metadata
    from deface.weights import export_weights

    cfg = OmegaConf.load(args.run / ".hydra" / "config.yaml")
    cfg.paths.output_dir = str(args.run)  # stands in for the ${hydra:...} interpolation
    cfg.export.name, cfg.export.version = args.name, args.version
    ckpt_path = pick_checkpoint(args.run, args.ckpt)
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    net_state = {k.removeprefix("net."): v for k, v in state["state_dict"].items() if k.startswith("net.")}
    metrics = epoch_metrics(args.run, int(state["epoch"]))
    metrics["epoch"] = int(state["epoch"])
    metrics["global_step"] = int(state["global_step"])
    wall = args.wall_time
    if wall is None:
        wall = ckpt_path.stat().st_mtime - (args.run / ".hydra" / "config.yaml").stat().st_mtime
    meta = build_metadata(cfg, metrics, wall)
    meta["checkpoint"] = ckpt_path.name
    if args.note:
        meta["training"]["note"] = args.note
    path = export_weights(net_state, meta, args.out, args.name)
    print(json.dumps({"weights": str(path), "epoch": metrics["epoch"], "metrics": metrics}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
