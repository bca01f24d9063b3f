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


TIMM = [  # (arch, kwargs shrinking it, default layer at 128 px, min_size=4 layer at 64 px)
    ("resnet50d", {"layers": (1, 1, 1, 1)}, "layer4", "layer3"),
    ("efficientnet_b0", {}, "bn2", "blocks.4"),
    ("convnext_tiny", {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}, "stages", "stages.2"),
    ("regnetx_002", {}, "s4", "s3"),
]


def saliency_shape(model: nn.Module, layer: str, size: int) -> tuple[int, ...]:
    with FeatureSaliency(model, layer) as features, torch.no_grad():
        with features.capture():
            model.eval()(torch.randn(1, 3, size, size))
        model.train()
        return tuple(features.pop().shape)


@pytest.mark.parametrize("arch,kwargs,layer,small", TIMM, ids=[t[0] for t in TIMM])
def test_timm_cnns_default_layer_and_min_size(arch, kwargs, layer, small):
    """timm CNNs of four families: the last stage by default (convnext's Identity ``norm_pre``
    after its stages is skipped), and with min_size=4 at 64 px the last stage, or stage of
    the last container, whose map is 4x4 or more."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=10, **kwargs)
    assert find_feature_layer(model, 128) == layer
    assert saliency_shape(model, layer, 128) == (1, 4, 4)
    assert find_feature_layer(model, 64) == layer
    assert find_feature_layer(model, 64, min_size=4) == small
    assert saliency_shape(model, small, 64) == (1, 4, 4)


@pytest.mark.parametrize("arch,layer", [("resnet18", "layer3"), ("mobilenet_v3_small", "features.8"),
                                        ("efficientnet_b0", "features.5")])
def test_min_size_picks_a_finer_layer_at_low_resolution(arch, layer):
    """At 64 px ResNet's layer4 is 2x2: min_size=4 gives layer3 (4x4); MobileNet/EfficientNet's
    ``features`` is 2x2 too: the last ``features.N`` with a 4x4 map."""
    model = getattr(torchvision.models, arch)(num_classes=10)
    assert find_feature_layer(model, 64, min_size=4) == layer
    assert saliency_shape(model, layer, 64) == (1, 4, 4)
    assert find_feature_layer(model, 64, min_size=2) == find_feature_layer(model, 64)
    with pytest.raises(ValueError, match=r"no layer of \w+ outputs a map of at least 40x40 for a "
                                         r"64x64 input .*lower min_size.*feature_layer"):
        find_feature_layer(model, 64, min_size=40)
    with pytest.raises(ValueError, match="min_size must be a positive int"):
        find_feature_layer(model, 64, min_size=0)


def tiny_vit() -> nn.Module:
    """torchvision's ViT (a conv patch embedding, then tokens): it accepts only 32 px input."""
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                                hidden_dim=16, mlp_dim=16, num_classes=10)


def test_a_failed_probe_says_so_and_names_the_option():
    """A model with a fixed input size probed at another: a ValueError naming the probe's size
    and ``feature_layer`` (not the model's own AssertionError); probed at its size (or on
    an example batch) the layer is found."""
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"probing VisionTransformer with a \(1, 3, 128, 128\) input to "
                                         r"find its feature layer failed \(AssertionError: .*feature_layer"):
        find_feature_layer(model)
    assert find_feature_layer(model, 32) == "conv_proj"
    assert find_feature_layer(model, example=torch.randn(5, 3, 32, 32)) == "conv_proj"


def test_layer_search_errors_name_the_problem():
    with pytest.raises(ValueError, match="has no Conv2d layer"):
        find_feature_layer(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)))
    flat = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    with pytest.raises(ValueError, match=r"no direct child of Sequential outputs a spatial map .* for a "
                                         r"128x128 input; inner layers that do: 0\.0; .*feature_layer"):
        find_feature_layer(flat)
    tokens = nn.Sequential(nn.Flatten(2), nn.Linear(64, 8))
    with pytest.raises(ValueError, match=r"for a 8x8 input; no layer of it does; name the layer "
                                         r"explicitly with feature_layer"):
        find_feature_layer(tokens, example=torch.randn(2, 3, 8, 8))


def test_lazy_layer_choice_probes_the_first_batch():
    """probe_size=None: no layer until the first batch, probed on its first image at its size,
    in eval mode, the training modes restored; then the map of the batch is captured."""
    seen = []

    class Sized(nn.Module):  # a 2-stage CNN that accepts 40 px only and records its calls
        def __init__(self):
            super().__init__()
            self.stem, self.stage = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

        def forward(self, x):
            assert x.shape[-1] == 40, "40 px only"
            seen.append((x.shape[0], self.training))
            return self.head(self.stage(self.stem(x)))
    model = Sized()
    with pytest.raises(ValueError, match=r"\(1, 3, 128, 128\) input to find its feature layer failed"):
        FeatureSaliency(model)
    features = FeatureSaliency(model, probe_size=None)
    assert features.layer is None
    with pytest.raises(RuntimeError, match="not chosen yet"):
        with features.capture():
            pass
    x = torch.randn(3, 3, 40, 40)
    with features, features.capture(x), torch.no_grad():
        assert features.layer == "stage" and seen == [(1, False)] and model.training
        model(x)
        assert features.pop().shape == (3, 20, 20)


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
