"""LightningModule: Dice + cross-entropy training; validation on whole heads seen as the wrapper sees them."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from monai.losses import DiceCELoss

from deface import BRAIN, FACE
from deface.network import downsampling_factor, probabilities


def dice_and_recall(pred: torch.Tensor, target: torch.Tensor, cls: int) -> tuple[float, float]:
    """Dice and recall of class ``cls`` between two label maps (nan when both are empty)."""
    p, t = pred == cls, target == cls
    inter = (p & t).sum().item()
    denom = p.sum().item() + t.sum().item()
    dice = 2 * inter / denom if denom else float("nan")
    recall = inter / t.sum().item() if t.sum().item() else float("nan")
    return dice, recall


class DefaceLitModule(L.LightningModule):
    """Wraps the U-Net; ``net`` comes from Hydra (``model.net``). ``roi_size``: the training patch,
    beyond which the wrapper sees a grid through a window on the head (written as
    ``preprocessing.input_shape``); ``spacing``: the validation grid's voxel size in mm. Both have
    no default here: they are the data's (``configs/model/unet_base.yaml`` takes them from
    ``data.synth``), so that the training patch and grid are written in one place."""

    def __init__(self, net: torch.nn.Module, *, roi_size: tuple[int, int, int], spacing: float,
                 lr: float = 2e-3, weight_decay: float = 1e-5,
                 init_weights: str | None = None, warmup_steps: int = 100) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        if init_weights:
            from deface.weights import load_state_dict

            state, _ = load_state_dict(init_weights)
            self.net.load_state_dict(state)
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
        # every input side a multiple of the strides' product (a net without ``strides``: 16)
        self.multiple = downsampling_factor({"strides": list(getattr(net, "strides", [16]))})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.net(batch["image"])
        loss = self.loss(logits, batch["labels"][:, None])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        image, labels = batch["image"], batch["labels"]
        # the wrapper's view (network.probabilities), not a sliding window: a window pads a grid
        # smaller than the patch up to it, and the network then sees the head differently
        probs = probabilities(self.net, [image[0]], tuple(self.hparams.roi_size), self.multiple,
                              self.hparams.spacing, image.device)[0][None]
        labels = labels.cpu()
        loss = self.loss(torch.log(probs.clamp_min(1e-6)), labels[:, None])  # softmax(log p) = p
        pred = probs.argmax(1)
        metrics = {"val/loss": loss.item()}
        for name, cls in (("face", FACE), ("brain", BRAIN)):
            dice, recall = dice_and_recall(pred, labels, cls)
            if dice == dice:
                metrics[f"val/dice_{name}"] = dice
            if recall == recall:
                metrics[f"val/recall_{name}"] = recall
        self.log_dict(metrics, batch_size=1, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warm = max(min(self.hparams.warmup_steps, total // 4), 1)

        def factor(step: int) -> float:  # linear warm-up, then cosine decay to 2 %
            if step < warm:
                return (step + 1) / warm
            progress = min((step - warm) / max(total - warm, 1), 1.0)
            return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
