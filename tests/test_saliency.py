"""Saliency sources: the forward hook (layer choice, the map, no autograd, capture/remove) and
the input-gradient reductions, against independent computations on real torchvision CNNs."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

from mixing.saliency import FeatureSaliency, channel_norm, find_feature_layer, gradient_saliency


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def resnet_layer4(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer4's output, computed by calling the stages by hand (no hook involved)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


@pytest.mark.parametrize("arch,layer", [
    ("resnet18", "layer4"), ("resnet50", "layer4"), ("mobilenet_v3_small", "features"),
    ("efficientnet_b0", "features"), ("densenet121", "features"), ("squeezenet1_1", "features"),
])
def test_default_layer_is_the_last_convolutional_stage(arch, layer):
    """torchvision CNNs: layer4 of ResNets, ``features`` of the others; training modes restored
    module by module (a BatchNorm kept in eval stays in eval)."""
    model = getattr(torchvision.models, arch)(num_classes=10).train()
    frozen = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)) if arch != "squeezenet1_1" \
        else next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    frozen.eval()
    assert find_feature_layer(model) == layer
    assert model.training and not frozen.training
    assert sum(m.training for m in model.modules()) == len(list(model.modules())) - 1


def test_layer_search_errors_name_the_problem():
    with pytest.raises(ValueError, match="has no Conv2d layer"):
        find_feature_layer(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)))
    flat = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    with pytest.raises(ValueError, match="no direct child of Sequential outputs a spatial map"):
        find_feature_layer(flat)


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_map_is_the_channel_sum_of_absolute_features(resnet18, amp):
    """The captured map equals sum_c |A_c| of layer4's output computed by hand, in float32 and
    under bfloat16 autocast (where it is accumulated in float32 from the bf16 features)."""
    resnet18.eval()
    x = torch.randn(3, 3, 64, 64)
    with FeatureSaliency(resnet18) as features, torch.autocast("cpu", torch.bfloat16, enabled=amp is not None):
        assert features.layer == "layer4"
        with features.capture():
            resnet18(x)
        got = features.pop()
        want = resnet_layer4(resnet18, x).double().abs().sum(1)
    assert got.dtype == torch.float32 and got.shape == (3, 2, 2)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    resnet18.train()


def test_fp16_features_are_summed_without_overflow():
    """512 fp16 channels of 200 sum to 102400 > 65504 (the fp16 maximum): the map is exact."""
    class ToHalf(nn.Module):
        def forward(self, x):
            return x.half()
    conv = nn.Conv2d(3, 512, 1)
    nn.init.zeros_(conv.weight)
    nn.init.constant_(conv.bias, -200.0)
    model = nn.Sequential(conv, ToHalf())
    with FeatureSaliency(model, "1") as features:
        with features.capture():
            out = model(torch.randn(2, 3, 4, 4))
        assert torch.isinf(out.sum(1)).all()  # what a naive fp16 reduction would give
        torch.testing.assert_close(features.pop(), torch.full((2, 4, 4), 102400.0))


def test_hook_keeps_no_graph_and_adds_no_autograd_work(resnet18):
    """The map carries no autograd history, and the parameter gradients are bit-identical
    with and without the hook capturing."""
    x = torch.randn(2, 3, 32, 32)

    def grads(capture: bool):
        resnet18.zero_grad()
        torch.manual_seed(0)
        with FeatureSaliency(resnet18, "layer4") as features:
            if capture:
                with features.capture():
                    resnet18(x).sum().backward()
                saliency = features.pop()
                assert not saliency.requires_grad and saliency.grad_fn is None
            else:
                resnet18(x).sum().backward()
        return [p.grad.clone() for p in resnet18.parameters()]
    for a, b in zip(grads(True), grads(False)):
        assert torch.equal(a, b)


def test_captures_only_inside_capture_and_releases_the_map(resnet18):
    x = torch.randn(2, 3, 32, 32)
    with FeatureSaliency(resnet18, "layer4") as features, torch.no_grad():
        resnet18(x)
        with pytest.raises(RuntimeError, match="did not run inside capture"):
            features.pop()
        with features.capture():
            resnet18(x)
        assert features.pop().shape == (2, 1, 1)
        with pytest.raises(RuntimeError, match="did not run inside capture"):
            features.pop()


def test_remove_takes_the_hook_off(resnet18):
    """After remove() (or leaving the with block) capturing records nothing."""
    x = torch.randn(2, 3, 32, 32)
    features = FeatureSaliency(resnet18, "layer4")
    features.remove()
    with FeatureSaliency(resnet18, "layer4") as other:
        pass
    for f in (features, other):
        with f.capture(), torch.no_grad():
            resnet18(x)
        with pytest.raises(RuntimeError, match="did not run inside capture"):
            f.pop()


def test_any_module_by_dotted_name(resnet18):
    """A user-named inner module: the map is that module's sum_c |A_c|."""
    resnet18.eval()
    x = torch.randn(2, 3, 32, 32)
    with FeatureSaliency(resnet18, "layer3.1.conv2") as features, torch.no_grad():
        with features.capture():
            resnet18(x)
        stem = resnet18.maxpool(resnet18.relu(resnet18.bn1(resnet18.conv1(x))))
        block = resnet18.layer3[1]
        h = block.relu(block.bn1(block.conv1(resnet18.layer3[0](resnet18.layer2(resnet18.layer1(stem))))))
        torch.testing.assert_close(features.pop(), block.conv2(h).abs().sum(1))
    resnet18.train()


def test_bad_layer_names_are_clear_errors(resnet18):
    """A missing layer lists close names; a layer without a spatial output says so."""
    with pytest.raises(ValueError, match="no layer named 'layr4'; close names: layer4"):
        FeatureSaliency(resnet18, "layr4")
    with FeatureSaliency(resnet18, "fc") as features, features.capture():
        with pytest.raises(ValueError, match=r"feature layer 'fc' must output a \(N, C, h, w\) tensor"):
            resnet18(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gradient_saliency_reductions_match_reference(dtype):
    """mean_abs (default) = mean_c |g_c| and l2 = sqrt(sum_c g_c^2), per pixel, as float32."""
    grad = (torch.randn(3, 3, 5, 6) * 1e3).to(dtype)
    g = grad.double()
    mean_abs = torch.stack([torch.stack([torch.stack([g[n, :, i, j].abs().mean() for j in range(6)])
                                         for i in range(5)]) for n in range(3)])
    l2 = torch.stack([torch.stack([torch.stack([g[n, :, i, j].square().sum().sqrt() for j in range(6)])
                                   for i in range(5)]) for n in range(3)])
    for got, want in ((gradient_saliency(grad), mean_abs), (gradient_saliency(grad, "l2"), l2)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_gradient_saliency_bad_input():
    with pytest.raises(ValueError, match="gradient reduction must be one of"):
        gradient_saliency(torch.randn(2, 3, 4, 4), "max")
    with pytest.raises(ValueError, match=r"input gradient must be \(N, C, H, W\)"):
        gradient_saliency(torch.randn(3, 4, 4))


LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="needs CUDA"))]


def plain_reductions(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The formulas, in float64: mean_c |t_c|, sqrt(sum_c t_c^2), sum_c |t_c|."""
    d = t.double()
    return {"mean_abs": d.abs().mean(1), "l2": d.square().sum(1).sqrt(), "abs_sum": d.abs().sum(1)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reductions_equal_the_plain_formula_in_each_layout_and_dtype(dtype, layout, device):
    """gradient_saliency (mean_abs, l2) of a 3-channel gradient and the hook's sum_c |A_c| of
    a 512-channel (and a 40-channel) feature map equal the formulas, float32 out, for NCHW and
    channels-last inputs in float32, float16 and bfloat16 (accumulated in float32: 512 fp16
    values of ~100 sum past the fp16 range)."""
    g = torch.Generator().manual_seed(0)
    grad = (torch.randn(4, 3, 9, 10, generator=g) * 1e2).to(dtype)
    feats = [(torch.randn(3, c, 5, 6, generator=g) * 1e2).to(dtype) for c in (512, 40)]
    grad, *feats = (t.to(device).contiguous(memory_format=LAYOUTS[layout]) for t in (grad, *feats))
    want = plain_reductions(grad)
    for reduction in ("mean_abs", "l2"):
        got = gradient_saliency(grad, reduction)
        assert got.dtype == torch.float32 and got.shape == (4, 9, 10)
        torch.testing.assert_close(got.double(), want[reduction], rtol=1e-6, atol=1e-6)
    for feat in feats:
        got = channel_norm(feat, 1)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), plain_reductions(feat)["abs_sum"], rtol=1e-5, atol=1e-4)


class OpRecorder(TorchFunctionMode):
    """Records each op's name and its float32 tensor outputs' sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.float32_sizes: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.names.append(getattr(func, "__name__", str(func)))
        if isinstance(out, torch.Tensor) and out.dtype == torch.float32:
            self.float32_sizes.append(out.numel())
        return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_reductions_avoid_the_slow_kernel_and_a_float32_copy(dtype, layout):
    """On the CPU neither reduction goes through ``torch.linalg.vector_norm`` (whose CPU kernel
    took 281 ms where the plain ops take 8 on a (64, 3, 160, 160) channels-last gradient),
    and a float16/bfloat16 input is never copied to float32 whole."""
    grad = torch.randn(2, 3, 8, 8).to(dtype).contiguous(memory_format=LAYOUTS[layout])
    feat = torch.randn(2, 512, 3, 3).to(dtype).contiguous(memory_format=LAYOUTS[layout])
    for call, t in ((lambda: gradient_saliency(grad), grad), (lambda: gradient_saliency(grad, "l2"), grad),
                    (lambda: channel_norm(feat, 1), feat)):
        with OpRecorder() as ops:
            call()
        assert "vector_norm" not in ops.names
        if dtype != torch.float32:
            assert max(ops.float32_sizes) < t.numel()
