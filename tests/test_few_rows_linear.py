"""`few_rows_linear`: the decode step's head product as `weight @ x^T` on a CPU, equal to `nn.Linear` for any number
of rows, and `nn.Linear` itself wherever a module could have been wrapped (hooks) or replaced, or wherever that form
was measured slower on this CPU (`transposed_product_is_faster`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_models import modeling_zoo_common
from hf_models.modeling_zoo_common import FEW_ROWS, few_rows_linear, transposed_product_is_faster


@pytest.fixture(autouse=True)
def transposed_form(request, monkeypatch):
    """The transposed form wherever it may run (whatever this CPU measured), so the tests below exercise it; the
    measurement's own tests opt out with the `measured` marker, on an empty table."""
    monkeypatch.setattr(modeling_zoo_common, "TRANSPOSED_IS_FASTER", {})
    if "measured" not in request.keywords:
        monkeypatch.setattr(modeling_zoo_common, "transposed_product_is_faster", lambda weight, rows: True)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (3, 1), (2, 3), (1, FEW_ROWS + 1), (5,)])
def test_equals_the_linear_layer_for_every_row_count(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(24, 40, bias=bias)
    x = torch.randn(*shape, 24)
    out = few_rows_linear(linear, x)
    assert out.shape == (*shape, 40)
    torch.testing.assert_close(out, linear(x), rtol=1e-5, atol=1e-6)


def test_a_non_contiguous_input_and_its_gradients():
    torch.manual_seed(0)
    linear = nn.Linear(16, 32)
    x = torch.randn(16, 3, requires_grad=True)
    few_rows_linear(linear, x.T).square().sum().backward()
    expected_grads = [x.grad.clone(), linear.weight.grad.clone(), linear.bias.grad.clone()]
    x.grad = linear.weight.grad = linear.bias.grad = None
    linear(x.T).square().sum().backward()
    for got, expected in zip(expected_grads, [x.grad, linear.weight.grad, linear.bias.grad]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_hooked_or_replaced_layers_run_their_own_forward():
    linear = nn.Linear(8, 8)
    calls = []
    linear.register_forward_hook(lambda module, args, output: calls.append(output))
    few_rows_linear(linear, torch.randn(2, 8))
    assert len(calls) == 1

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    doubled = Doubled(8, 8)
    x = torch.randn(1, 8)
    torch.testing.assert_close(few_rows_linear(doubled, x), 2 * nn.functional.linear(x, doubled.weight, doubled.bias))


def test_under_cpu_autocast_the_output_has_the_linear_layers_dtype():
    linear = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = few_rows_linear(linear, x), linear(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.measured
def test_the_form_is_measured_once_per_shape_and_row_count(monkeypatch):
    """Both forms timed (a fake clock decides which is faster), the winner kept and the shape not timed again,
    `few_rows_linear` following it; without a random draw, so the caller's generator state is untouched."""
    timed, times = [], {}

    def seconds(product, repeats=3):  # the plain form is timed first, then the transposed one
        timed.append(product)
        return times["plain" if len(timed) % 2 else "transposed"]

    monkeypatch.setattr(modeling_zoo_common, "_seconds", seconds)
    linear = nn.Linear(24, 40)
    state = torch.random.get_rng_state()
    times.update(plain=2.0, transposed=1.0)
    assert transposed_product_is_faster(linear.weight, 3) is True and len(timed) == 2
    assert transposed_product_is_faster(linear.weight, 3) is True and len(timed) == 2  # remembered
    times.update(plain=1.0, transposed=2.0)
    assert transposed_product_is_faster(linear.weight, 1) is False and len(timed) == 4
    assert torch.equal(torch.random.get_rng_state(), state)
    assert modeling_zoo_common.TRANSPOSED_IS_FASTER == {(40, 24, 3, torch.float32): True,
                                                        (40, 24, 1, torch.float32): False}
    plain_calls = []
    forward = nn.Linear.forward
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: plain_calls.append(1) or forward(self, x))
    few_rows_linear(linear, torch.randn(1, 24))  # measured slower for one row: the layer's own forward
    few_rows_linear(linear, torch.randn(3, 24))  # faster for three: the transposed product
    assert len(plain_calls) == 1 and len(timed) == 4


@pytest.mark.measured
def test_a_compiled_graph_uses_the_measured_form_and_the_plain_one_when_unmeasured():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    linear = nn.Linear(24, 40)
    x = torch.randn(2, 24)
    counter = CompileCounter()
    compiled = torch.compile(lambda x: few_rows_linear(linear, x), backend=counter, fullgraph=True)
    torch.testing.assert_close(compiled(x), linear(x), rtol=1e-5, atol=1e-6)
    assert modeling_zoo_common.TRANSPOSED_IS_FASTER == {}  # nothing timed inside the graph
    assert counter.frame_count == 1
    torch._dynamo.reset()
    modeling_zoo_common.TRANSPOSED_IS_FASTER[(40, 24, 2, torch.float32)] = True
    counter = CompileCounter()
    compiled = torch.compile(lambda x: few_rows_linear(linear, x), backend=counter, fullgraph=True)
    torch.testing.assert_close(compiled(x), linear(x), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1 and counter.op_count >= 2  # the transposed product and its slice
    torch._dynamo.reset()
