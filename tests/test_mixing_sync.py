"""No device-to-host sync in the mixing hot path.

On the CPU, the mixers and the two-pass step run on the **meta** device: tensors with shapes
and no values, so reading a value on the host (``.item()``, ``.tolist()``, ``bool()``,
``int()``...) or running an op whose output shape depends on values (``nonzero``, boolean
masks) raises, and every ``device.type == "cpu"`` branch takes the path CUDA takes. A
``TorchFunctionMode`` records, during the same run, what meta cannot refuse: a CPU tensor
used beside device tensors (a 0-d CPU tensor is read on the host per op, and older torch
rejects it, e.g. as ``lerp_``'s weight), a host-to-device copy without ``non_blocking=True``,
a Python list used as an index of a device tensor, and ``torch.tensor``/``as_tensor`` onto a
device. Passing proves that with a CPU generator the code issues none of the operations by
which PyTorch makes the host wait for a device; it does not see syncs inside CUDA libraries
(cuDNN autotuning, the caching allocator), which the CUDA tests below cover with
``torch.cuda.set_sync_debug_mode("error")``.
"""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from mixing import SAGE, CutMix, Mixup, SaliencyGrafting, TwoPassStep
from tests.test_step import TinyNet

K = 5
META = torch.device("meta")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"}
COPIES = {"to", "copy_", "cuda"}


def _tensors(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _tensors(item, out)
    return out


class HostSyncRecorder(TorchFunctionMode):
    """Records every call that would make the host wait for a (non-CPU) device."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        tensors = _tensors(list(args) + list(kwargs.values()), [])
        on_device = [t for t in tensors if t.device.type != "cpu"]
        if name in READS and on_device:
            self.found.append(f"{name}() of a {on_device[0].device} tensor")
        elif name in COPIES:
            if name == "copy_":
                src, dst = args[1], args[0].device
            else:
                src, dst = args[0], self._destination(args, kwargs)
            if src.device.type == "cpu" and dst is not None and dst.type != "cpu" \
                    and not kwargs.get("non_blocking", False):
                self.found.append(f"blocking {name}() from the CPU to {dst}")
        elif name in ("tensor", "as_tensor") and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type != "cpu":
            self.found.append(f"torch.{name}(host data, device={kwargs['device']})")
        elif on_device and len(on_device) < len(tensors) and name != "pin_memory":
            self.found.append(f"{name}() mixes a CPU tensor with {on_device[0].device} tensors")
        elif name in ("__getitem__", "__setitem__") and args[0].device.type != "cpu" \
                and any(isinstance(i, list) for i in (args[1] if isinstance(args[1], tuple) else (args[1],))):
            self.found.append(f"{name} of a device tensor with a Python list (a host-to-device copy)")
        return func(*args, **kwargs)

    @staticmethod
    def _destination(args, kwargs) -> torch.device | None:
        if func_dst := kwargs.get("device"):
            return torch.device(func_dst)
        for a in args[1:]:
            if isinstance(a, torch.Tensor):
                return a.device
            if isinstance(a, (str, torch.device)):
                return torch.device(a)
        return None


def meta_batch(n=6, size=32, dtype=torch.float32, channels_last=False):
    x = torch.empty(n, 3, size, size, device=META, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.empty(n, dtype=torch.int64, device=META)


MIXERS = {
    "mixup": (lambda: Mixup(K), None),
    "cutmix": (lambda: CutMix(K), None),
    "grafting": (lambda: SaliencyGrafting(K), (4, 4)),
    "grafting_top_k": (lambda: SaliencyGrafting(K, top_k=3, label_mix="area"), (7, 7)),
    "sage": (lambda: SAGE(K), (32, 32)),
    "sage_coarse": (lambda: SAGE(K, search_size=8, full_res_search=0), (32, 32)),
    "sage_wo_or_sm": (lambda: SAGE(K, rearrange=False, soft_mask=False), (16, 16)),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(MIXERS))
def test_mix_makes_no_host_read_of_device_values(name, dtype, channels_last):
    """Each mixer's mix(), fed device (meta) tensors and a CPU generator: no host read of a
    device value, no data-dependent shape, no blocking copy, no CPU tensor among device ones."""
    make, saliency_size = MIXERS[name]
    x, labels = meta_batch(dtype=dtype, channels_last=channels_last)
    saliency = None if saliency_size is None else torch.empty(6, *saliency_size, device=META)
    with HostSyncRecorder() as recorder:
        result = make().mix(x, labels, saliency, generator=torch.Generator().manual_seed(0))
    assert recorder.found == []
    assert result.targets.device == META and result.perm.device == META
    assert result.weight.device == META


@pytest.mark.parametrize("name", ["grafting", "sage", "mixup", "cutmix"])
def test_two_pass_step_makes_no_host_read_of_device_values(name):
    """TwoPassStep (clean pass, saliency, mix, mixed pass, both backwards) on device (meta)
    tensors with a CPU generator: nothing waits for the device."""
    model = TinyNet().to(META, memory_format=torch.channels_last)
    mixer = SaliencyGrafting(K, grid_sizes=[4]) if name == "grafting" else MIXERS[name][0]()
    step = TwoPassStep(model, mixer, eta=0.5)
    x, labels = meta_batch(size=16, channels_last=True)
    with HostSyncRecorder() as recorder:
        out = step(x, labels, generator=torch.Generator().manual_seed(0))
    assert recorder.found == []
    assert out.loss.device == META


def test_the_recorder_sees_each_kind_of_sync():
    """The recorder is not blind: each pattern the mixers used to have is reported."""
    x = torch.empty(4, 3, 8, 8, device=META)
    found = []
    calls = [lambda: x.lerp_(x, torch.tensor(0.5)), lambda: x[[0, -1]],
             lambda: torch.arange(3).to(META), lambda: torch.tensor(1.0, device=META),
             lambda: x.copy_(torch.zeros(4, 3, 8, 8))]
    for call in calls:
        with HostSyncRecorder() as recorder:
            call()
        found.append(len(recorder.found))
    with pytest.raises((RuntimeError, NotImplementedError)):   # what meta refuses by itself
        int(x.sum())
    assert found == [1, 1, 1, 1, 1]


class LabelReads(TorchFunctionMode):
    """Counts the reductions (min, max, aminmax) run on one tensor."""

    def __init__(self, labels: torch.Tensor) -> None:
        super().__init__()
        self.labels, self.count = labels, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("min", "max", "aminmax") and args and args[0] is self.labels:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["grafting", "sage", "mixup"])
def test_a_cpu_step_checks_the_label_values_once(name):
    """On the CPU a step reads its labels' value range once: not again for the one-hot
    targets nor inside the mixer it calls (which, called on its own, still checks)."""
    mixer = SaliencyGrafting(K, grid_sizes=[4]) if name == "grafting" else MIXERS[name][0]()
    step = TwoPassStep(TinyNet(), mixer)
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(6, 3, 16, 16, generator=g), torch.randint(K, (6,), generator=g)
    with LabelReads(labels) as reads:
        step(x, labels, generator=torch.Generator().manual_seed(0))
    assert reads.count == 1
    saliency = torch.rand(6, 16, 16)
    with LabelReads(labels) as reads:
        mixer.mix(x, labels, saliency, generator=torch.Generator().manual_seed(0))
    assert reads.count == 1


# -- on CUDA ------------------------------------------------------------------------------------

def cuda_batch(n=8, size=32, dtype=torch.float32, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g).clamp_(-4, 4).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(K, (n,), generator=g)
    return x, labels, g


def saliency_for(name, n, g):
    size = MIXERS[name][1]
    return None if size is None else torch.rand(n, *size, generator=g) ** 2


@CUDA
@pytest.mark.parametrize("name", list(MIXERS))
def test_cuda_mix_runs_under_sync_debug_error(name):
    """mix() on CUDA with a CPU generator, after one warm-up call, under
    ``set_sync_debug_mode("error")``: any synchronising CUDA call raises."""
    make, _ = MIXERS[name]
    mixer = make()
    x, labels, g = cuda_batch()
    saliency = saliency_for(name, len(x), g)
    x, labels = x.cuda(), labels.cuda()
    saliency = None if saliency is None else saliency.cuda()
    mixer.mix(x.clone(), labels, saliency, generator=torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mixer.mix(x, labels, saliency, generator=torch.Generator().manual_seed(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@CUDA
@pytest.mark.parametrize("amp", [None, torch.float16])
@pytest.mark.parametrize("name", ["grafting", "sage", "mixup"])
def test_cuda_two_pass_step_runs_under_sync_debug_error(name, amp, monkeypatch):
    """A whole two-pass step on CUDA (autocast and a GradScaler for fp16) does not sync."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # autotuning may sync
    model = TinyNet().cuda().to(memory_format=torch.channels_last)
    mixer = SaliencyGrafting(K, grid_sizes=[4]) if name == "grafting" else MIXERS[name][0]()
    scaler = torch.amp.GradScaler("cuda", enabled=amp is not None)
    step = TwoPassStep(model, mixer, scaler=scaler, amp_dtype=amp)
    x, labels, _ = cuda_batch(size=16, channels_last=True)
    x, labels = x.cuda().contiguous(memory_format=torch.channels_last), labels.cuda()
    step(x.clone(), labels, generator=torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(x.clone(), labels, generator=torch.Generator().manual_seed(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@CUDA
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 4e-3),
                                         (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("name", list(MIXERS))
def test_cuda_equals_cpu_on_identical_draws(name, dtype, atol, channels_last):
    """The same CPU generator seed on a CPU and a CUDA batch: the same draws, so the same
    pairing, mask, shift and weights, images equal to the dtype's precision, layout kept."""
    make, _ = MIXERS[name]
    x, labels, g = cuda_batch(dtype=dtype, channels_last=channels_last)
    saliency = saliency_for(name, len(x), g)
    cpu, gpu = x.clone(), x.cuda()
    rc = make().mix(cpu, labels, saliency, generator=torch.Generator().manual_seed(5))
    rg = make().mix(gpu, labels.cuda(), None if saliency is None else saliency.cuda(),
                    generator=torch.Generator().manual_seed(5))
    assert gpu.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(rg.perm.cpu(), rc.perm)
    if rc.shift is not None:
        assert torch.equal(rg.shift.cpu(), rc.shift)
    if rc.mask is not None:
        torch.testing.assert_close(rg.mask.cpu(), rc.mask, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rg.weight.cpu(), rc.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rg.targets.cpu(), rc.targets, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu.cpu().float(), cpu.float(), rtol=0, atol=atol)
