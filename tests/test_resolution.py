"""Progressive-resizing schedules: FFCV's ramp, phases, crop scales, building from data, and bad
input."""
import numpy as np
import pytest

from pipelines.resolution import (DEFAULT_MIN_SCALE, DefaultMinScale, Fixed, LinearRamp, Phase,
                                  Phases, ResolutionSchedule, schedule_from_dict)


def ffcv_get_resolution(epoch, min_res, max_res, end_ramp, start_ramp):
    """FFCV's ``get_resolution`` (ffcv-imagenet ``train_imagenet.py``), as published."""
    assert min_res <= max_res
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


@pytest.mark.parametrize("min_res,max_res,start_ramp,end_ramp", [
    (160, 192, 65, 76),    # ffcv-imagenet rn50, 88 epochs
    (160, 192, 11, 13),    # ffcv-imagenet rn18, 16 epochs
    (128, 256, 2, 10),     # steeper ramp: several multiples of 32 in between
    (160, 224, 5, 5),      # degenerate ramp: a jump
    (100, 200, 0, 7),      # bounds that are not multiples of 32
])
def test_linear_ramp_matches_ffcv_formula_at_every_epoch(min_res, max_res, start_ramp, end_ramp):
    """LinearRamp gives exactly FFCV's resolution for every epoch of the run and beyond."""
    ramp = LinearRamp(min_res, max_res, start_ramp, end_ramp)
    for epoch in range(end_ramp + 5):
        assert ramp.resolution(epoch) == ffcv_get_resolution(epoch, min_res, max_res, end_ramp, start_ramp)
    assert ramp.max_resolution() == max_res


def test_linear_ramp_known_values():
    """Hand-computed points of the rn50 ramp: flat, mid-ramp rounded to 32, flat at the top."""
    ramp = LinearRamp(160, 192, 65, 76)
    assert [ramp.resolution(e) for e in (0, 65, 66, 70, 71, 76, 87)] == [160, 160, 160, 160, 192, 192, 192]
    steep = LinearRamp(128, 256, 0, 4)     # 128, 160, 192, 224, 256
    assert [steep.resolution(e) for e in range(5)] == [128, 160, 192, 224, 256]
    assert LinearRamp(128, 256, 0, 4, multiple=8, bs=64).batch_size(3) == 64


def test_fixed_schedule_is_constant():
    """Fixed keeps one resolution and its optional batch size for every epoch."""
    s = Fixed(64, bs=16)
    assert {s.resolution(e) for e in range(50)} == {64}
    assert {s.batch_size(e) for e in range(50)} == {16}
    assert Fixed(64).batch_size(3) is None and s.max_resolution() == 64


def test_phases_switch_exactly_at_start_epochs():
    """Each phase's resolution and batch size hold from its start epoch until the next one."""
    s = Phases((Phase(0, 128, 512), Phase(3, 224, 256), Phase(5, 288)))
    assert [s.resolution(e) for e in range(8)] == [128, 128, 128, 224, 224, 288, 288, 288]
    assert [s.batch_size(e) for e in range(8)] == [512, 512, 512, 256, 256, None, None, None]
    assert s.max_resolution() == 288
    assert s.phase(4) == Phase(3, 224, 256)


def test_schedule_from_dict_builds_every_kind():
    """Ints, mappings of each kind, and schedule objects all become the right schedule."""
    assert schedule_from_dict(96) == Fixed(96)
    assert schedule_from_dict({"kind": "fixed", "res": 96, "bs": 8}) == Fixed(96, 8)
    assert schedule_from_dict({"kind": "ramp", "min_res": 160, "max_res": 192, "start_ramp": 11,
                               "end_ramp": 13}) == LinearRamp(160, 192, 11, 13)
    phases = schedule_from_dict({"kind": "phases", "phases": [
        {"start_epoch": 0, "res": 128, "bs": 64}, {"start_epoch": 2, "res": 192}]})
    assert phases == Phases((Phase(0, 128, 64), Phase(2, 192)))
    ramp = LinearRamp(64, 128, 1, 3)
    assert schedule_from_dict(ramp) is ramp
    assert all(isinstance(s, ResolutionSchedule) for s in (phases, ramp, Fixed(32)))


def test_phases_set_the_crop_scale_of_their_epochs_the_others_the_default():
    """The fast protocol's phases: 0.08 (the default) at 128 px, 0.087 from epoch 15 on; Fixed
    and LinearRamp crop at the default every epoch."""
    s = schedule_from_dict({"kind": "phases", "phases": [
        {"start_epoch": 0, "res": 128, "bs": 1024},
        {"start_epoch": 15, "res": 224, "bs": 448, "min_scale": 0.087}]})
    assert s.min_scale(20) == 0.087 and s.min_scale(3) == 0.08
    assert [s.min_scale(e) for e in (0, 14, 15, 99)] == [0.08, 0.08, 0.087, 0.087]
    assert Phases((Phase(0, 64, min_scale=1),)).min_scale(0) == 1.0
    assert DEFAULT_MIN_SCALE == 0.08
    assert {Fixed(64).min_scale(e) for e in range(5)} == {0.08}
    assert LinearRamp(64, 128, 1, 3).min_scale(9) == 0.08


class UserSchedule:
    """A schedule of user code written before crop scales: sizes only."""

    def resolution(self, epoch):
        return 64 + 32 * epoch

    def batch_size(self, epoch):
        return 8

    def max_resolution(self):
        return 128


def test_a_user_schedule_without_min_scale_crops_at_the_default():
    """schedule_from_dict keeps its sizes and gives it the default scale; one that has
    min_scale is used as it is."""
    wrapped = schedule_from_dict(UserSchedule())
    assert isinstance(wrapped, DefaultMinScale) and isinstance(wrapped, ResolutionSchedule)
    assert (wrapped.resolution(2), wrapped.batch_size(2), wrapped.max_resolution()) == (128, 8, 128)
    assert wrapped.min_scale(2) == DEFAULT_MIN_SCALE
    scaled = type("Scaled", (UserSchedule,), {"min_scale": lambda self, epoch: 0.5})()
    assert schedule_from_dict(scaled) is scaled


@pytest.mark.parametrize("spec,message", [
    ({"kind": "cosine"}, "unknown resolution schedule kind 'cosine'"),
    ({"res": 64}, "unknown resolution schedule kind None"),
    ({"kind": "fixed"}, "bad 'fixed' resolution schedule"),
    ({"kind": "fixed", "res": 64, "size": 3}, "unexpected keyword argument 'size'"),
    ({"kind": "fixed", "res": 4}, "res must be an int >= 8"),
    ({"kind": "fixed", "res": 64.0}, "res must be an int >= 8"),
    ({"kind": "fixed", "res": 64, "bs": 0}, "batch_size must be a positive int"),
    ({"kind": "fixed", "res": 64, "bs": True}, "batch_size must be a positive int"),
    ({"kind": "ramp", "min_res": 160}, "missing 3 required positional arguments"),
    ({"kind": "ramp", "min_res": 192, "max_res": 160, "start_ramp": 0, "end_ramp": 2}, "min_res (192) > max_res (160)"),
    ({"kind": "ramp", "min_res": 160, "max_res": 192, "start_ramp": 5, "end_ramp": 2}, "start_ramp <= end_ramp"),
    ({"kind": "ramp", "min_res": 160, "max_res": 192, "start_ramp": 0, "end_ramp": 2, "multiple": 0}, "multiple must be >= 1"),
    ({"kind": "phases"}, "missing the 'phases' list"),
    ({"kind": "phases", "phases": []}, "at least one phase"),
    ({"kind": "phases", "phases": [{"start_epoch": 1, "res": 64}]}, "must start at epoch 0"),
    ({"kind": "phases", "phases": [{"start_epoch": 0, "res": 64}, {"start_epoch": 0, "res": 96}]}, "increase strictly"),
    ({"kind": "phases", "phases": [{"start_epoch": 0, "res": 64}], "extra": 1}, "unexpected keys ['extra']"),
    ({"kind": "phases", "phases": [{"start_epoch": 0, "size": 64}]}, "bad 'phases' resolution schedule"),
    *[({"kind": "phases", "phases": [{"start_epoch": 0, "res": 64, "min_scale": bad}]},
       "min_scale must be a number in (0, 1]")
      for bad in (0, -0.1, 1.5, float("nan"), True, "0.5")],
    ({"kind": "fixed", "res": 64, "min_scale": 0.5}, "unexpected keyword argument 'min_scale'"),
])
def test_bad_schedules_raise_errors_naming_the_problem(spec, message):
    """Every malformed schedule is rejected with a ValueError that says what is wrong."""
    with pytest.raises(ValueError) as info:
        schedule_from_dict(spec)
    assert message in str(info.value)


@pytest.mark.parametrize("spec", [True, "224", 224.0, [128, 224]])
def test_non_schedule_values_are_type_errors(spec):
    """A bool, string, float or list is not a schedule (a bool is not silently an int)."""
    with pytest.raises(TypeError, match="resolution schedule must be"):
        schedule_from_dict(spec)


@pytest.mark.parametrize("epoch", [-1, 1.0, True, None])
def test_bad_epochs_are_rejected(epoch):
    """Every schedule rejects an epoch that is not a non-negative int."""
    for s in (Fixed(64), LinearRamp(64, 128, 0, 2), Phases((Phase(0, 64),))):
        for method in (s.resolution, s.min_scale):
            with pytest.raises(ValueError, match="epoch must be a non-negative int"):
                method(epoch)
    with pytest.raises(ValueError, match="epoch must be a non-negative int"):
        DefaultMinScale(UserSchedule()).min_scale(epoch)
