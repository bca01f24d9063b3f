"""TwoPassStep's options: the feature layer found at the first batch's resolution (lazily, on
one image, in eval mode) or at a smaller minimum map size, and the two passes' weights
(clean_weight, mixed_weight) against passes computed separately."""
from __future__ import annotations

import re

import pytest
import torch
import torchvision
from torch import nn

from mixing.baselines import Mixup
from mixing.grafting import SaliencyGrafting
from mixing.step import TwoPassStep
from tests.test_step import K, TinyNet, assert_grads_close, data, make_mixer, reference, step_grads


class FixedSize(TinyNet):
    """TinyNet that accepts 24 px input only (like a ViT) and records (N, training) per call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (24, 24), "24 px only"
        self.calls.append((x.shape[0], self.training))
        return super().forward(x)


@pytest.mark.parametrize("mix", [True, False], ids=["mixed", "warmup"])
def test_feature_layer_is_probed_on_one_image_of_the_first_batch(mix):
    """The default layer is chosen at the first step (warm-up included, so that the hook exists
    before a compiled model first runs) by one eval-mode forward of that batch's first image,
    not by a 128 px probe at construction; the training mode is restored."""
    model = FixedSize()
    step = TwoPassStep(model, make_mixer("feature"))
    assert step.features.layer is None and model.calls == []
    images, labels = data(size=24)
    out = step(images, labels, mix=mix)
    assert step.features.layer == "stage" and model.training
    assert model.calls[0] == (1, False) and all(c == (6, True) for c in model.calls[1:])
    assert len(model.calls) == (3 if mix else 2)
    if mix:
        assert out.saliency.shape == (6, 12, 12)
    with pytest.raises(ValueError, match=r"\(1, 3, 128, 128\) input to find its feature layer failed "
                                         r"\(AssertionError: 24 px only\)"):
        TwoPassStep(FixedSize(), make_mixer("feature"), feature_probe_size=128)


def test_feature_min_size_reaches_the_layer_choice():
    """ResNet-18 at 64 px: layer4 is 2x2, feature_min_size=4 gives layer3's 4x4 map."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=K)
    images, labels = data(n=4, size=64)
    step = TwoPassStep(model, SaliencyGrafting(K, grid_sizes=[4]), feature_min_size=4)
    out = step(images, labels, generator=torch.Generator().manual_seed(0))
    assert step.features.layer == "layer3" and out.saliency.shape == (4, 4, 4)
    default = TwoPassStep(model, SaliencyGrafting(K, grid_sizes=[4]))
    assert default(*data(n=4, size=64)).saliency.shape == (4, 2, 2)
    assert default.features.layer == "layer4"


@pytest.mark.parametrize("kind", ["feature", "gradient"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.7, 0.3), (0.0, 2.0), (1.5, 0.0)])
def test_clean_and_mixed_weights_give_the_weighted_sum(kind, weights):
    """Gradients = clean_weight * g_clean + mixed_weight * g_mixed, the loss likewise; (1, 1) is
    PuzzleMix's full-weight sum; a zero weight skips that pass's parameter gradient (mixed
    weight 0: a plain clean pass with the clean weight)."""
    clean_w, mixed_w = weights
    torch.manual_seed(0)
    model, (images, labels) = TinyNet(), data()
    mixer = make_mixer(kind)
    grads, saliency, mixed_x, _, clean, mixed = reference(model, mixer, images, labels, 0.5, seed=3,
                                                          weights=weights)
    step = TwoPassStep(model, mixer, clean_weight=clean_w, mixed_weight=mixed_w)
    out = step(images, labels, generator=torch.Generator().manual_seed(3))
    assert_grads_close(step_grads(model), grads, rtol=1e-5, atol=1e-6)
    if mixed_w == 0:
        assert out.mix is None
        torch.testing.assert_close(out.loss, clean_w * clean)
        return
    torch.testing.assert_close(out.saliency, saliency, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(images, mixed_x)
    torch.testing.assert_close(out.loss, clean_w * clean + mixed_w * mixed)


def test_single_pass_and_unmixed_steps_keep_weight_one():
    """The weights belong to the two passes: Mixup's one pass and a warm-up step have weight 1."""
    images, labels = data()
    for mixer, mix in ((Mixup(K), True), (make_mixer("feature"), False)):
        torch.manual_seed(0)
        a, b = TinyNet(), TinyNet()
        b.load_state_dict(a.state_dict())
        g = torch.Generator().manual_seed(0)
        TwoPassStep(a, mixer)(images.clone(), labels, mix=mix, generator=g)
        g = torch.Generator().manual_seed(0)
        TwoPassStep(b, mixer, clean_weight=3.0, mixed_weight=2.0)(images.clone(), labels, mix=mix, generator=g)
        assert_grads_close(step_grads(b), step_grads(a))


@pytest.mark.parametrize("kwargs,message", [
    ({"clean_weight": 1.0}, "give clean_weight and mixed_weight together"),
    ({"mixed_weight": 1.0}, "give clean_weight and mixed_weight together"),
    ({"clean_weight": -1.0, "mixed_weight": 1.0}, "clean_weight must be a finite number >= 0, got -1.0"),
    ({"clean_weight": 1.0, "mixed_weight": float("inf")}, "mixed_weight must be a finite number >= 0"),
    ({"clean_weight": 0.0, "mixed_weight": 0.0}, "both 0"),
    ({"eta": 0.5, "clean_weight": 1.0, "mixed_weight": 1.0}, "eta=0.5 and clean_weight/mixed_weight both given"),
    ({"feature_min_size": 4, "feature_layer": "stage"}, "min_size=4 only applies to the automatic choice"),
])
def test_bad_options_raise_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TwoPassStep(TinyNet(), make_mixer("feature"), **kwargs)


@pytest.mark.parametrize("option", ["feature_min_size", "feature_probe_size"])
def test_feature_options_only_for_feature_mixers(option):
    with pytest.raises(ValueError, match=f"{option}=4 is only used by feature-saliency mixers"):
        TwoPassStep(TinyNet(), Mixup(K), **{option: 4})


@pytest.mark.parametrize("loss_scale", [0.0, -1.0, float("nan")])
def test_bad_loss_scale_is_an_error(loss_scale):
    with pytest.raises(ValueError, match="loss_scale must be a finite number > 0"):
        TwoPassStep(TinyNet(), make_mixer("feature"))(*data(), loss_scale=loss_scale)


def test_models_without_spatial_output_name_the_option():
    """A feature mixer on a model with no spatial map: the first step says so, naming feature_layer."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, K))
    with pytest.raises(ValueError, match="no layer of it does; name the layer explicitly with feature_layer"):
        TwoPassStep(model, make_mixer("feature"))(*data())
