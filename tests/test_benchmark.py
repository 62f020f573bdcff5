"""The benchmarks' yardsticks: MFU counts the model's FLOPs, however the model computes them; the EMA
benchmark times forms that all compute the EMA; the garbage collector's pauses are recorded only
while asked for."""

from __future__ import annotations

import gc

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from repae.benchmarking import module_input_shapes
from repae.kernels import use_fast_kernels
from repae.modules import vae as vae_module
from scripts import benchmark
from scripts.bench import ema as benchmark_ema

from test_ema import a_model_and_its_ema, train_a_little


def convolution_flops(counter: FlopCounterMode) -> int:
    return counter.get_flop_counts()["Global"][torch.ops.aten.convolution]


def test_garbage_collection_pauses_are_recorded_by_generation_only_while_started():
    pauses = benchmark.GarbageCollectionPauses()
    gc.disable()  # only the collections asked for below
    try:
        gc.collect(1)
        pauses.start()
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
        pauses.stop()
        gc.collect(1)
    finally:
        gc.enable()
    summary = pauses.summary()
    assert set(summary) == {"generation_0", "generation_2"}
    assert summary["generation_0"]["count"] == 1 and summary["generation_2"]["count"] == 2
    assert 0 < summary["generation_2"]["max_ms"] <= summary["generation_2"]["total_ms"]


def test_the_vae_benchmarks_time_each_module_kind_at_the_input_shapes_the_vae_gives_it():
    shapes = module_input_shapes("f4d4-tiny", 5, 32, vae_module.Upsample)
    # f4: the decoder upsamples its 8x8 latents twice, to 32x32.
    assert [shape[0] for shape in shapes] == [5, 5]
    assert [shape[2:] for shape in shapes] == [(8, 8), (16, 16)]
    norms = module_input_shapes("f4d4-tiny", 5, 32, torch.nn.GroupNorm)
    vae = vae_module.build_vae("f4d4-tiny")
    assert len(norms) == sum(isinstance(module, torch.nn.GroupNorm) for module in vae.modules())
    assert {shape[2] for shape in norms} == {8, 16, 32}


def test_flops_count_the_upsampling_as_the_model_defines_it_not_as_it_runs():
    """benchmark.py counts the FLOPs with the fast kernels off: the network as vae.py defines it."""
    torch.manual_seed(0)
    decoder = use_fast_kernels(vae_module.build_vae("f4d4-tiny").decoder)
    latents = torch.randn(2, 4, 8, 8)
    upsampling_inputs = []
    hooks = [
        module.register_forward_hook(lambda _m, args, _out: upsampling_inputs.append(args[0].shape))
        for module in decoder.modules()
        if isinstance(module, vae_module.Upsample)
    ]
    with torch.no_grad(), FlopCounterMode(display=False) as executed:
        fast = decoder(latents)
    for hook in hooks:
        hook.remove()
    use_fast_kernels(decoder, enabled=False)
    with torch.no_grad(), FlopCounterMode(display=False) as counted:
        as_defined = decoder(latents)

    # A 3x3 convolution on the upsampled grid: 36 multiply-adds per input pixel and channel pair;
    # the transposed convolution does 16.
    saved = sum(2 * b * c * c * (36 - 16) * h * w for b, c, h, w in upsampling_inputs)
    assert upsampling_inputs
    assert convolution_flops(counted) - convolution_flops(executed) == saved
    torch.testing.assert_close(as_defined, fast, rtol=1e-4, atol=1e-5)


def a_model_its_ema_and_the_ema_before():
    model, ema = a_model_and_its_ema()
    train_a_little(model)
    return model, ema, [t.clone() for t in benchmark_ema.averaged_tensors(ema, model)[0]]


@pytest.mark.parametrize("form", sorted(benchmark_ema.FORMS))
def test_every_ema_form_the_benchmark_times_computes_the_ema(form):
    model, ema, before = a_model_its_ema_and_the_ema_before()
    benchmark_ema.FORMS[form](ema, model)(torch.tensor(True))
    decay = benchmark_ema.DECAY
    ema_tensors, model_tensors = benchmark_ema.averaged_tensors(ema, model)
    for found, old, new in zip(ema_tensors, before, model_tensors, strict=True):
        torch.testing.assert_close(found, decay * old + (1 - decay) * new, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("form", sorted(set(benchmark_ema.FORMS) - {"python_weight"}))
def test_the_ema_forms_weighted_on_the_device_leave_the_ema_on_a_skipped_step(form):
    model, ema, before = a_model_its_ema_and_the_ema_before()
    benchmark_ema.FORMS[form](ema, model)(torch.tensor(False))
    for found, old in zip(benchmark_ema.averaged_tensors(ema, model)[0], before, strict=True):
        assert torch.equal(found, old)
