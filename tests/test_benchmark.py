"""The benchmarks' yardsticks: MFU counts the model's FLOPs, however the model computes them; the EMA
and optimizer benchmarks time forms that all compute today's update, and skip a step alike; the
garbage collector's pauses are recorded only while asked for; a result names the files that made it."""

from __future__ import annotations

import gc
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from repae.benchmarking import LARGEST_UNTRACKED_FILE, module_input_shapes, working_tree_hash
from repae.kernels import use_fast_kernels
from repae.modules import vae as vae_module
from repae.modules.sit import SiTBlock, build_sit
from scripts import benchmark
from scripts.bench import ema as benchmark_ema
from scripts.bench import linear, optimizer

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


def test_the_one_pass_candidates_update_weights_moments_and_ema_as_fused_adamw_then_the_ema_do():
    torch.manual_seed(0)
    sit = build_sit(
        "SiT-S/2", depth=2, encoder_depth=1, in_channels=4, input_size=8, z_dims=[16], num_classes=10
    )
    compared = optimizer.compare_forms(sit, compile=False)
    assert set(compared) == set(optimizer.FORMS)
    for name, entry in compared.items():
        # Rounding (the update computed in another order) is at most ~1e-3 of a change; a wrong formula ~1.
        for kind, difference in entry["largest_difference_over_change"].items():
            assert difference < 1e-2, (name, kind, difference)


def test_a_skipped_pass_of_a_candidate_changes_nothing_and_the_next_one_counts_as_the_first():
    torch.manual_seed(0)
    sit = build_sit(
        "SiT-S/2", depth=1, encoder_depth=1, in_channels=4, input_size=8, z_dims=[16], num_classes=10
    )
    ema = optimizer.make_ema(sit)
    form = optimizer.FORMS["one_pass_foreach"](sit, ema, False)
    before = {kind: [t.clone() for t in tensors] for kind, tensors in form.tensors().items()}
    first, poisoned, _ = optimizer.gradient_sets(form.params)
    form([g.clone() for g in poisoned], *optimizer.finite_and_divisor(poisoned))
    for kind, tensors in form.tensors().items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, before[kind], strict=True)), kind
    assert form.step.item() == 0
    form([g.clone() for g in first], *optimizer.finite_and_divisor(first))
    # AdamW's first step moves every weight with a non-zero gradient by about the learning rate.
    moved = torch.cat([(a - b).abs().flatten() for a, b in zip(form.params, before["weights"], strict=True)])
    assert form.step.item() == 1 and moved.max().item() == pytest.approx(optimizer.LR, rel=1e-3)


def test_a_results_tree_hash_is_its_commits_when_the_files_are_that_commits_whatever_git_says(
    tmp_path: Path,
):
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path, check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip

    git("init", "-q")
    (tmp_path / ".gitignore").write_text("logs/\n")
    (tmp_path / "model.py").write_text("width = 1152\n")
    git("add", "--all")
    git("commit", "-q", "-m", "first")
    first = git("rev-parse", "HEAD^{tree}")
    assert working_tree_hash(tmp_path) == first
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "run.txt").write_text("ignored files are no code")
    assert working_tree_hash(tmp_path) == first
    (tmp_path / "model.py").write_text("width = 1024\n")
    changed = working_tree_hash(tmp_path)
    assert changed != first
    git("add", "model.py")
    git("commit", "-q", "-m", "second")
    assert git("rev-parse", "HEAD^{tree}") == changed  # the hash names the commit of those files
    # data kept in the checkout is no code, and is not copied into .git/objects
    (tmp_path / "images [1].h5").write_bytes(b"\0" * (LARGEST_UNTRACKED_FILE + 1))
    assert working_tree_hash(tmp_path) == changed
    (tmp_path / "images [1].h5").unlink()
    (tmp_path / "new_script.py").write_text("print(1)\n")  # untracked files ran too
    assert working_tree_hash(tmp_path) != changed
    assert git("status", "--porcelain") == "?? new_script.py"  # the repository's index is untouched


def test_a_profile_counts_the_compiled_emas_foreach_kernels_apart_from_inductors_element_wise_ones():
    families = {
        name: benchmark.kernel_family(name)
        for name in (
            "triton_for_fused_1",
            "triton_poi_fused_gelu_view_23",
            "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
            "cudnn_generated_fort_native_sdpa_sm90_flash_fprop",
            "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT",
        )
    }
    assert list(families.values()) == [
        "compiled foreach ops (the EMA under model.compile)",
        "Triton (inductor-fused element-wise, norms, reductions)",
        "foreach ops (fused AdamW, gradient norm, the uncompiled EMA)",
        "attention",
        "matmul (cuBLAS)",
    ]


def test_the_fp32_weight_gradient_linear_gives_todays_block_with_weight_gradients_not_rounded_to_bf16():
    torch.manual_seed(0)
    block = SiTBlock(64, 4)
    candidate = linear.with_fp32_weight_grads(block)
    x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    outputs = {}
    for name, form in (("today", block), ("candidate", candidate)):
        x_form = x.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            outputs[name] = form(x_form, c)
        outputs[name].float().square().mean().backward()
        outputs[name + "_input_grad"] = x_form.grad
    assert torch.equal(outputs["today"], outputs["candidate"])
    assert torch.equal(outputs["today_input_grad"], outputs["candidate_input_grad"])
    linears = [
        (a, b) for a, b in zip(block.modules(), candidate.modules(), strict=True) if isinstance(a, nn.Linear)
    ]
    assert len(linears) == 5 and all(
        type(b) is linear.Fp32WeightGradLinear for _, b in linears
    )  # qkv, proj, fc1, fc2, adaLN
    for today, fp32 in linears:
        for p_today, p_fp32 in ((today.weight, fp32.weight), (today.bias, fp32.bias)):
            # today's gradient is the candidate's rounded to bf16
            assert torch.allclose(p_fp32.grad, p_today.grad, rtol=2**-8, atol=0)
            assert not torch.equal(p_fp32.grad, p_fp32.grad.bfloat16().float())


def test_compiled_the_fp32_weight_gradient_linears_weight_gradients_are_still_not_rounded_to_bf16():
    torch.manual_seed(0)
    candidate = linear.with_fp32_weight_grads(SiTBlock(64, 4))
    compiled = torch.compile(candidate, backend="aot_eager", fullgraph=True)
    linear.forward_backward(compiled, torch.randn(2, 16, 64), torch.randn(2, 64), autocast=True)
    weights = [
        layer.weight for layer in candidate.modules() if isinstance(layer, linear.Fp32WeightGradLinear)
    ]
    assert len(weights) == 5
    for weight in weights:
        assert weight.grad.dtype == torch.float32
        assert not torch.equal(weight.grad, weight.grad.bfloat16().float())
