"""Top-1, top-5 and loss over a validation set sharded over ranks."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import all_reduce_sum


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, amp_dtype: torch.dtype | None,
             flip_tta: bool = False) -> dict[str, float]:
    """Metrics of ``model`` over every rank's batches (each rank counts its exact shard once,
    sums all-reduced); ``flip_tta`` averages each image's logits with its mirror image's."""
    training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss, n
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    for images, labels in batches:
        with autocast:
            logits = model(images).float()
            if flip_tta:
                logits = (logits + model(torch.flip(images, dims=[3])).float()) / 2
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == labels[:, None]
        sums += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(),
                             F.cross_entropy(logits, labels, reduction="sum"),
                             torch.tensor(labels.shape[0], device=device)]).double()
    top1, top5, loss, n = all_reduce_sum(sums.tolist(), device)
    model.train(training)
    return {"val_top1": top1 / n, "val_top5": top5 / n, "val_loss": loss / n,
            "val_images": int(n)}
