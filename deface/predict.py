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
    """Index -> index of a job; loading happens in the module, next to the network."""

    def __init__(self, jobs: list) -> None:
        self.jobs = jobs

    def __len__(self) -> int:
        return len(self.jobs)

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
    """Wraps a ``Defacer``: the network moves with the module, pre/postprocessing stay on CPU.
    ``jobs``: ``inference.Job`` for every file; each rank runs its share through
    ``Defacer.predict_from_files``, ``batch_size`` images per network call."""

    def __init__(self, defacer, jobs: list, batch_size: int = 1, workers: int = 1, scrub: bool = False) -> None:
        super().__init__()
        self.defacer = defacer
        self.net = defacer.network
        self.jobs = jobs
        self.batch_size, self.workers, self.scrub = batch_size, workers, scrub

    def predict_dataloader(self) -> DataLoader:
        # Called after the processes are launched, so the rank and world size are known here.
        sampler = StridedSampler(len(self.jobs), self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(FileDataset(self.jobs), batch_size=self.batch_size, sampler=sampler, num_workers=0)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> list[tuple[str, str, str]]:
        self.defacer.device = self.device
        jobs = [self.jobs[i] for i in batch.tolist()]
        done = self.defacer.predict_from_files(jobs, batch_size=len(jobs), workers=self.workers,
                                               scrub=self.scrub)
        return [(job.name, o.status, o.details) for job, o in zip(jobs, done)]


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


def run(jobs: list, outdir: Path, weights: str | None, accelerator: str, devices: int | str, num_nodes: int,
        strategy: str, batch_size: int = 1, workers: int = 1, scrub: bool = False, mode: str = "zero") -> None:
    """Deface ``jobs`` (``inference.Job``) with ``Defacer.predict_from_files`` on every rank."""
    from deface.inference import Defacer

    defacer = Defacer(weights=weights, device="cpu", mode=mode)
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                        logger=False, enable_checkpointing=False, use_distributed_sampler=False,
                        callbacks=[ManifestWriter(outdir)], enable_progress_bar=False)
    trainer.predict(DefacePredictor(defacer, jobs, batch_size, workers, scrub), return_predictions=False)


def main(argv: list[str] | None = None) -> int:
    from deface import MODES
    from deface.cli import UsageError, expand_inputs, output_path
    from deface.inference import Job

    p = argparse.ArgumentParser(prog="python -m deface.predict", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+")
    p.add_argument("-o", "--outdir", type=Path, required=True)
    p.add_argument("--suffix", default="_defaced")
    p.add_argument("--weights", default=None)
    p.add_argument("--mode", choices=MODES, default="zero")
    p.add_argument("--save-mask", action="store_true", help="also write <name>_defacemask.nii.gz")
    p.add_argument("--scrub", action="store_true", help="clear NIfTI free-text fields and extensions")
    p.add_argument("--batch-size", type=int, default=1, help="images per network call on each rank")
    p.add_argument("--workers", type=int, default=1, help="reader and writer threads on each rank")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--strategy", default="auto", help="e.g. ddp (several GPUs / nodes; gloo on CPU)")
    p.add_argument("--skip-existing", action="store_true")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        p.error("--batch-size must be >= 1 and --workers >= 0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        inputs, missing = expand_inputs(args.inputs)
    except UsageError as exc:
        p.error(str(exc))  # one line and exit 2, as deface-infer
    for item in missing:
        log.error("%s: no such file, or no NIfTI/MGH files in it", item)
    args.outdir.mkdir(parents=True, exist_ok=True)
    io.remove_stale_temporaries([args.outdir])  # only this node's dead writers' (or day-old) files
    jobs = []
    for src in inputs:
        dst = output_path(src, args, args.suffix)
        if args.skip_existing and dst.exists():
            continue
        stem, _ = io.split_suffix(dst)
        mask = dst.with_name(f"{stem.removesuffix(args.suffix)}_defacemask.nii.gz") if args.save_mask else None
        jobs.append(Job(src, dst, mask))
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    run(jobs, args.outdir, args.weights, args.accelerator, devices, args.num_nodes, args.strategy,
        args.batch_size, args.workers, args.scrub, args.mode)
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
