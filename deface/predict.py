"""Batch prediction across GPUs and nodes with Lightning (``trainer.predict`` + a prediction writer).

    python -m deface.predict scans/ -o defaced/ --accelerator gpu --devices 4 [--num-nodes 2]
    srun python -m deface.predict ...                     # under SLURM (see README: HPC)

Each rank takes every ``world_size``-th file (no padding, so no file is done twice), runs the same
``Defacer`` stages as ``deface-infer`` and writes its outputs atomically; each rank also writes a
manifest ``.deface_rank<N>.tsv`` (file, status, details) in the output folder.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset, Sampler

from deface import io

log = logging.getLogger("deface")


class FileDataset(Dataset):
    """Index -> (input, output) paths; loading happens in the module, next to the network."""

    def __init__(self, pairs: list[tuple[Path, Path]]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> int:
        return index


class StridedSampler(Sampler[int]):
    """Rank r of w gets indices r, r + w, r + 2w ...: every file exactly once across ranks."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class DefacePredictor(L.LightningModule):
    """Wraps a ``Defacer``: the network moves with the module, pre/postprocessing stay on CPU."""

    def __init__(self, defacer, pairs: list[tuple[Path, Path]]) -> None:
        super().__init__()
        self.defacer = defacer
        self.net = defacer.network
        self.pairs = pairs

    def predict_dataloader(self) -> DataLoader:
        # Called after the processes are launched, so the rank and world size are known here.
        sampler = StridedSampler(len(self.pairs), self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(FileDataset(self.pairs), batch_size=1, sampler=sampler, num_workers=0)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> list[tuple[str, str, str]]:
        self.defacer.device = self.device
        out = []
        for index in batch.tolist():
            src, dst = self.pairs[index]
            try:
                volume, canon = self.defacer.prepare(src)
                probs = self.defacer.predict([canon])[0]
                result = self.defacer.apply(volume, canon, probs)
                io.save(volume, result.raw, dst)
                out.append((str(src), "done", f"removed {result.stats['removed_ml']:.1f} mL"))
            except Exception as exc:  # one bad file never stops the batch
                out.append((str(src), "failed", io.one_line(exc)))
        return out


class ManifestWriter(BasePredictionWriter):
    """Appends every result of this rank to ``.deface_rank<N>.tsv`` as soon as a batch is done."""

    def __init__(self, folder: Path) -> None:
        super().__init__(write_interval="batch")
        self.folder = folder

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices, batch, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        with (self.folder / f".deface_rank{trainer.global_rank}.tsv").open("a") as f:
            for src, status, detail in prediction:
                f.write(f"{src}\t{status}\t{detail}\n")


def run(pairs: list[tuple[Path, Path]], outdir: Path, weights: str | None, accelerator: str, devices: int | str,
        num_nodes: int, strategy: str) -> None:
    from deface.inference import Defacer

    defacer = Defacer(weights=weights, device="cpu")
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                        logger=False, enable_checkpointing=False, use_distributed_sampler=False,
                        callbacks=[ManifestWriter(outdir)], enable_progress_bar=False)
    trainer.predict(DefacePredictor(defacer, pairs), return_predictions=False)


def main(argv: list[str] | None = None) -> int:
    from deface.cli import UsageError, expand_inputs, output_path

    p = argparse.ArgumentParser(prog="python -m deface.predict", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+")
    p.add_argument("-o", "--outdir", type=Path, required=True)
    p.add_argument("--suffix", default="_defaced")
    p.add_argument("--weights", default=None)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--strategy", default="auto", help="e.g. ddp (several GPUs / nodes; gloo on CPU)")
    p.add_argument("--skip-existing", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        inputs, missing = expand_inputs(args.inputs)
    except UsageError as exc:
        p.error(str(exc))  # one line and exit 2, as deface-infer
    for item in missing:
        log.error("%s: no such file, or no NIfTI/MGH files in it", item)
    args.outdir.mkdir(parents=True, exist_ok=True)
    io.remove_stale_temporaries([args.outdir])  # only this node's dead writers' (or day-old) files
    pairs = [(src, output_path(src, args, args.suffix)) for src in inputs]
    if args.skip_existing:
        pairs = [(s, d) for s, d in pairs if not d.exists()]
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    run(pairs, args.outdir, args.weights, args.accelerator, devices, args.num_nodes, args.strategy)
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
