"""Lightning DataModule: synthetic + real training samples, whole real heads for validation."""

from __future__ import annotations

import fnmatch
import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deface.data.cache import load_subject
from deface.data.synthesis import Subject, SynthConfig, synthesize

log = logging.getLogger("deface.data")


def select(cache_dir: Path, patterns: list[str], exclude: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """Cache files whose stem matches any of the glob ``patterns`` and none of ``exclude``, less
    those whose labels the cache's label check flagged (``index.json``; deface.data.label_check)."""
    files = sorted(Path(cache_dir).glob("*.npz"))
    index_path = Path(cache_dir) / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    chosen = []
    for f in files:
        if not any(fnmatch.fnmatch(f.stem, p) for p in patterns) or any(fnmatch.fnmatch(f.stem, p) for p in exclude):
            continue
        flags = index.get(f.stem, {}).get("flags")
        if flags:
            log.warning("%s left out: implausible labels (%s)", f.stem, "; ".join(flags))
            continue
        chosen.append(f)
    return chosen


class SynthDataset(Dataset):
    """``length`` random samples per epoch, each from a randomly chosen subject.

    ``real_fraction`` of the samples come from real images, the rest from BrainWeb synthesis.
    """

    def __init__(self, subjects: list[Subject], cfg: SynthConfig, length: int, real_fraction: float = 0.4,
                 seed: int = 0) -> None:
        self.synth = [s for s in subjects if s.tissue is not None]
        self.real = [s for s in subjects if s.tissue is None]
        if not self.synth and not self.real:
            raise ValueError("no training subjects")
        self.cfg, self.length, self.seed = cfg, length, seed
        self.real_fraction = real_fraction if self.real and self.synth else float(bool(self.real))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index, torch.initial_seed() % 2**32])
        pool = self.real if rng.uniform() < self.real_fraction else self.synth
        subject = pool[rng.integers(len(pool))]
        image, labels = synthesize(subject, self.cfg, rng)
        return {"image": image, "labels": labels}


class WholeHeadDataset(Dataset):
    """Real heads on the canonical 2 mm grid as the wrapper makes them, for validation in its view
    (``network.probabilities``)."""

    def __init__(self, subjects: list[Subject], spacing: float = 2.0, multiple: int = 16) -> None:
        from deface.preprocessing import resample, to_canonical

        self.items = []
        for s in subjects:
            if s.image is None:
                continue
            canon = to_canonical(s.float_image().numpy(), s.affine, spacing, multiple)
            labels = resample(s.labels[None].float(), s.affine, canon.grid, mode="nearest")[0].long()
            self.items.append({"image": canon.image, "labels": labels, "name": s.name})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)


class DefaceDataModule(L.LightningDataModule):
    def __init__(self, cache_dir: str, train: list[str], val: list[str], synth: dict | None = None,
                 samples_per_epoch: int = 200, batch_size: int = 2, num_workers: int = 2,
                 real_fraction: float = 0.4, seed: int = 0, exclude: list[str] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        synth = dict(synth or {})
        self.synth_cfg = SynthConfig(**{k: (tuple(v) if k in ("patch", "scale") else v) for k, v in synth.items()})

    def setup(self, stage: str | None = None) -> None:
        cache = Path(self.hparams.cache_dir)
        # Validation heads never train, even when a training pattern (e.g. real_ixi*) matches them.
        exclude = list(self.hparams.exclude or []) + list(self.hparams.val)
        train_files = select(cache, list(self.hparams.train), exclude)
        val_files = select(cache, list(self.hparams.val))
        if not train_files:
            raise FileNotFoundError(f"no training subjects in {cache} matching {list(self.hparams.train)}")
        self.train_set = SynthDataset([load_subject(f) for f in train_files], self.synth_cfg,
                                      self.hparams.samples_per_epoch, self.hparams.real_fraction, self.hparams.seed)
        self.val_set = WholeHeadDataset([load_subject(f) for f in val_files], self.synth_cfg.spacing)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers,
                          shuffle=False, drop_last=True, persistent_workers=self.hparams.num_workers > 0,
                          pin_memory=torch.cuda.is_available(), worker_init_fn=_one_thread)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1, num_workers=0,
                          collate_fn=lambda b: {"image": b[0]["image"][None], "labels": b[0]["labels"][None]})
