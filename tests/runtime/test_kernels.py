"""pyro_lmscm.runtime.kernels: float32 GEMMs for bfloat16 linears on CPUs without bf16 kernels."""

import contextlib

import pytest
import torch

from pyro_lmscm.runtime import bf16_kernels, bf16_linears_in_float32, kernels

# -- bf16_linears_in_float32: float32 GEMMs for bfloat16 linears on CPUs without bf16 kernels ----


def _float32_gemm(x, weight, bias=None):
    """The independent computation: the exact float32 images of the bf16 operands, one float32
    GEMM, rounded to bfloat16."""
    out = x.double().float() @ weight.double().float().T
    return (out if bias is None else out + bias.float()).bfloat16()


def test_bf16_linears_run_as_float32_gemms_from_min_rows_and_natively_below(monkeypatch):
    """Which kernel runs is seen by the dtype ``F.linear`` receives (the native kernel and the
    float32 GEMM may agree bit for bit on some CPUs); the baseline is the call outside the
    scope, which receives bfloat16 whatever the rows."""
    seen: list[torch.dtype] = []
    linear = torch.nn.functional.linear

    def spy(x, *args):
        seen.append(x.dtype)
        return linear(x, *args)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48, dtype=torch.bfloat16)
    for rows in (1, 7, 8, 40):
        x = torch.randn(rows, 64).bfloat16()
        seen.clear()
        native = layer(x)
        assert seen == [torch.bfloat16]
        seen.clear()
        with torch.no_grad(), bf16_linears_in_float32(layer, min_rows=8):
            inside = layer(x)
        assert inside.dtype == torch.bfloat16
        if rows >= 8:  # one float32 GEMM, bit for bit the independent float32 computation
            assert seen == [torch.float32]
            assert torch.equal(inside, _float32_gemm(x, layer.weight, layer.bias))
        else:  # the native kernel, bit for bit
            assert seen == [torch.bfloat16]
            assert torch.equal(inside, native)
    assert "forward" not in vars(layer)
    # nested in another scope it patches nothing; the enclosing one stays in force after it
    with torch.no_grad(), bf16_linears_in_float32(layer, min_rows=8):
        outer = vars(layer)["forward"]
        with bf16_linears_in_float32(layer, min_rows=1000):
            assert vars(layer)["forward"] is outer
        seen.clear()
        layer(torch.randn(8, 64).bfloat16())
        assert seen == [torch.float32]
    # a leading batch shape counts its rows: (2, 4) rows of 64 reach min_rows = 8
    x = torch.randn(2, 4, 64).bfloat16()
    with torch.no_grad(), bf16_linears_in_float32(layer, min_rows=8):
        assert torch.equal(layer(x), _float32_gemm(x, layer.weight, layer.bias))


@pytest.mark.parametrize("copy_budget", [1 << 30, 1000], ids=["kept", "over the budget: copied per call"])
def test_an_in_place_weight_edit_inside_the_scope_is_seen(copy_budget):
    """The float32 copy follows the weight's version: after ``copy_`` under no_grad (what
    WeightDelta and ROME do) the next call uses the edited weight. Baseline: the output of
    before the edit, which a copy kept regardless of the version would give again. A weight
    over the budget (16 x 32 x 4 bytes > 1000) gives the same bits, copied for each call."""
    torch.manual_seed(1)
    layer = torch.nn.Linear(32, 16, bias=False, dtype=torch.bfloat16)
    x = torch.randn(12, 32).bfloat16()
    with torch.no_grad(), bf16_linears_in_float32(layer, copy_budget=copy_budget):
        before = layer(x)
        layer.weight.copy_(layer.weight * -2)
        after = layer(x)
    assert torch.equal(after, _float32_gemm(x, layer.weight))
    assert not torch.equal(after, before)


def test_calls_needing_a_gradient_keep_the_native_kernel():
    torch.manual_seed(2)
    layer = torch.nn.Linear(32, 16, dtype=torch.bfloat16)
    x = torch.randn(12, 32).bfloat16()
    with bf16_linears_in_float32(layer):
        out = layer(x)
    assert torch.equal(out, torch.nn.functional.linear(x, layer.weight, layer.bias))
    out.float().sum().backward()
    assert layer.weight.grad is not None and bool(layer.weight.grad.abs().sum() > 0)


def test_the_scope_leaves_the_model_as_it_was_even_on_error(lm_bf16):
    ids = torch.tensor([[2, 3, 4, 5, 6, 7, 8, 9, 10]])
    before = lm_bf16.logits(ids)
    with pytest.raises(RuntimeError, match="inside"):
        with bf16_linears_in_float32(lm_bf16.model):
            assert sum("forward" in vars(m) for m in lm_bf16.model.modules()) == 15  # 2 x 7 + the head
            raise RuntimeError("inside")
    assert not any("forward" in vars(m) for m in lm_bf16.model.modules())
    assert torch.equal(lm_bf16.logits(ids), before)


def test_bf16_kernels_choose_float32_gemms_only_for_bf16_on_a_cpu_without_native_kernels(lm, lm_bf16, monkeypatch):
    monkeypatch.setattr(kernels, "native_bf16_gemm", lambda: False)
    assert not isinstance(bf16_kernels(lm_bf16), contextlib.nullcontext)
    assert isinstance(bf16_kernels(lm), contextlib.nullcontext)  # float32
    monkeypatch.setattr(kernels, "native_bf16_gemm", lambda: True)
    assert isinstance(bf16_kernels(lm_bf16), contextlib.nullcontext)
