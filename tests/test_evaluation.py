"""Validation metrics: top-1, top-5 and loss equal their definitions over every batch, and
flip TTA scores the mean of an image's logits and its mirror image's (loss included)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.evaluation import evaluate


def batches(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 4, 6, generator=gen), torch.randint(0, 7, (n,), generator=gen))
            for n in (5, 3)]  # a partial last batch, as validation has


def model() -> nn.Module:
    torch.manual_seed(0)  # asymmetric in width: a mirror image gets other logits
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 6, 7), nn.Dropout(0.5))


def reference(net: nn.Module, data, flip: bool) -> dict[str, float]:
    images = torch.cat([x for x, _ in data])
    labels = torch.cat([y for _, y in data])
    with torch.no_grad():
        net.eval()
        logits = net(images)
        if flip:
            logits = (logits + net(images.flip(3))) / 2
    top5 = logits.topk(5, dim=1).indices
    return {"val_top1": (top5[:, 0] == labels).double().mean().item(),
            "val_top5": (top5 == labels[:, None]).any(1).double().mean().item(),
            "val_loss": F.cross_entropy(logits.double(), labels).item(), "val_images": 8}


def test_metrics_equal_their_definitions_with_and_without_flip_tta():
    net, data = model(), batches()
    for flip in (False, True):
        net.train()
        got = evaluate(net, data, torch.device("cpu"), None, flip_tta=flip)
        assert net.training  # evaluation leaves the model's mode as it found it
        want = reference(net, data, flip)
        assert got.keys() == want.keys() and got["val_images"] == 8
        for key in ("val_top1", "val_top5", "val_loss"):
            assert abs(got[key] - want[key]) < 1e-6, (flip, key, got[key], want[key])


def test_flip_tta_changes_the_loss_of_an_asymmetric_model():
    """The two settings differ here, so the first test tells them apart."""
    net, data = model(), batches()
    plain = evaluate(net, data, torch.device("cpu"), None)
    tta = evaluate(net, data, torch.device("cpu"), None, flip_tta=True)
    assert abs(plain["val_loss"] - tta["val_loss"]) > 1e-3
