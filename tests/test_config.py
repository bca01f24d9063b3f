"""The configuration engine and the trainer's validation: every bad value is refused by name
before anything starts, every float form is read, every preset works with every mixer."""
from __future__ import annotations

from pathlib import Path

import pytest

import train_imagenet as ti
from training import config as conf

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flag, value, expected", [
    ("--optim.lr", "1e-3", 1e-3), ("--optim.weight_decay", "5e-5", 5e-5),
    ("--optim.lr", "2E+1", 20.0), ("--optim.lr", ".5", 0.5), ("--optim.lr", "3", 3.0)])
def test_floats_in_every_form_python_accepts(flag, value, expected):
    cfg = ti.parse_config([flag, value])
    section, name = flag[2:].split(".")
    assert getattr(getattr(cfg, section), name) == expected


def test_exponent_floats_in_yaml(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("optim: {lr: 1e-3, weight_decay: 5e-5, lr_schedule: piecewise,\n"
                      "        lr_knots: [[0, 1e-4], [1, 2e-1]]}\n")
    cfg = ti.parse_config(["--config", str(preset)])
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (1e-3, 5e-5)
    assert cfg.optim.lr_knots == [[0, 1e-4], [1, 0.2]]


@pytest.mark.parametrize("argv, message", [
    (["--data.val_resolution", "0"], r"data\.val_resolution: "),
    (["--data.val_batch_size", "0"], r"data\.val_batch_size: must be >= 1"),
    (["--mix", "grafting", "--mix.feature_layer", "layer9"], r"mix\.feature_layer: .*'layer9'"),
    (["--mix", "grafting", "--sage.search_fraction", "1.5"], r"sage: .*search_fraction"),
    (["--mix", "none", "--grafting.temperature", "0"], r"grafting: .*temperature"),
    (["--grafting.grid_sizes", "4"], r"grafting\.grid_sizes: 4 is not a list"),
    (["--grafting.grid_sizes", "[4, x]"], r"grafting\.grid_sizes\[1\]: 'x' is not a valid int"),
    (["--optim.lr", "fast"], r"optim\.lr: 'fast' is not a valid float"),
    (["--resume-override", "optim.lrr"], r"run\.resume_override: unknown config field 'optim\.lrr'"),
    (["--loader", "dali", "--data.decode", "gpu"], r"data\.decode: only the folder loader"),
    (["--data.ffcv_order", "quasi_random"], r"data\.ffcv_order: only the ffcv loader"),
])
def test_bad_values_name_their_field(argv, message):
    with pytest.raises(ti.ConfigError, match=message):
        ti.parse_config(argv)


def test_a_yaml_section_value_of_the_wrong_type_names_the_field(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("grafting: {grid_sizes: 4}\n")
    with pytest.raises(ti.ConfigError, match=r"grafting\.grid_sizes: 4 is not a list"):
        ti.parse_config(["--config", str(preset)])


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
@pytest.mark.parametrize("mix", ["none", "mixup", "cutmix", "grafting", "sage"])
def test_every_preset_builds_a_step_with_every_mixer(preset, mix):
    """Settings a mixer does not read (the demo's feature layer for SAGE) are ignored."""
    import torch

    cfg = ti.parse_config(["--config", str(REPO / "configs" / preset), "--mix", mix])
    model = ti.build_model(cfg, 10, torch.device("cpu"))
    mixer = ti.build_mixer(cfg, 10)
    step = ti.build_step(cfg, model, mixer, torch.amp.GradScaler("cpu", enabled=False), None)
    assert (step.features is not None) == (mix == "grafting")


def test_result_neutral_fields_are_declared_where_the_field_is():
    """Paths, cadence and logging may change on resume; anything that changes the maths may not."""
    fields = ti.result_fields(ti.Config().to_dict())
    for key in ("data.path", "data.workers", "run.name", "run.resume", "run.keep_last",
                "eval.every", "data.val_batch_size", "run.resume_override"):
        assert key not in fields, key
    for key in ("optim.lr", "data.batch_size", "mix.kind", "run.seed", "model.arch"):
        assert key in fields, key
    assert not any(k.startswith(("sage.", "grafting.")) for k in fields)  # mix.kind none


def test_check_type_reads_nested_hints():
    assert conf.check_type("k", [1, 2], list[int]) == [1, 2]
    assert conf.check_type("k", "1e-3", float | None) == 1e-3
    assert conf.check_type("k", None, float | None) is None
    with pytest.raises(conf.ConfigError, match=r"k: True is not a valid int"):
        conf.check_type("k", True, int)


def test_the_demo_preset_works_for_other_architectures():
    """The demo asks for a 4 x 4 feature map, not a ResNet layer name: MobileNet finds its own."""
    import torch

    cfg = ti.parse_config(["--config", str(REPO / "configs" / "demo.yaml"), "--arch", "mobilenet_v3_small"])
    model = ti.build_model(cfg, 10, torch.device("cpu"))
    step = ti.build_step(cfg, model, ti.build_mixer(cfg, 10), torch.amp.GradScaler("cpu", enabled=False), None)
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    out = step(x, torch.arange(4), mix=True, generator=torch.Generator().manual_seed(0))
    assert step.features.layer.startswith("features.") and out.saliency.shape[-1] >= 4


def test_a_model_the_layer_search_cannot_probe_is_refused_naming_the_option():
    with pytest.raises(ti.ConfigError, match=r"mix\.feature_layer: probing VisionTransformer .*128"):
        ti.parse_config(["--arch", "vit_b_16", "--mix", "grafting", "--data.resolution", "128"])


@pytest.mark.parametrize("argv, message", [
    (["--mix.clean_weight", "1"], r"mix\.clean_weight: set it together with mix\.mixed_weight"),
    (["--mix.clean_weight", "0", "--mix.mixed_weight", "0"], r"not both 0"),
    (["--optim.accum_steps", "3", "--batch-size", "16"], r"does not split into optim\.accum_steps=3"),
])
def test_pass_weights_and_accumulation_are_checked(argv, message):
    with pytest.raises(ti.ConfigError, match=message):
        cfg = ti.parse_config(argv)
        ti.check_world(cfg, 1)


def test_full_weight_passes_reach_the_step():
    import torch

    cfg = ti.parse_config(["--mix", "grafting", "--mix.clean_weight", "1", "--mix.mixed_weight", "1"])
    model = ti.build_model(cfg, 10, torch.device("cpu"))
    step = ti.build_step(cfg, model, ti.build_mixer(cfg, 10), torch.amp.GradScaler("cpu", enabled=False), None)
    assert (step.clean_weight, step.mixed_weight) == (1.0, 1.0)


def test_gpu_decode_without_cuda_is_refused():
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(ti.ConfigError, match=r"data\.decode: gpu needs CUDA"):
        ti.parse_config(["--data.decode", "gpu"])


@pytest.mark.parametrize("bounds, inside, outside", [
    (">= 1", [1, 2.5], [0, -1]), ("> 0", [1e-9], [0]), ("[0, 1)", [0, 0.5], [1, -0.1]),
    ("(0, 1]", [1, 0.5], [0, 1.1])])
def test_declared_bounds_are_checked_by_name(bounds, inside, outside):
    import dataclasses

    @dataclasses.dataclass
    class Section:
        x: float = conf.setting(0.5, bounds, note="a note")

    @dataclasses.dataclass
    class Cfg:
        s: Section = dataclasses.field(default_factory=Section)

    for value in inside:
        conf.check_settings(Cfg(Section(value)))
    for value in outside:
        with pytest.raises(conf.ConfigError, match=r"^s\.x: must .*\(a note\)$"):
            conf.check_settings(Cfg(Section(value)))
    conf.check_settings(Cfg(Section(None)))  # None: unset, always allowed


def test_a_malformed_bounds_declaration_fails_where_it_is_written():
    with pytest.raises(ValueError, match="bounds '>> 1'"):
        conf.setting(1, ">> 1")
