"""`few_rows_linear`: the decode step's head product as `weight @ x^T` on a CPU, equal to `nn.Linear` for any number
of rows, and `nn.Linear` itself wherever a module could have been wrapped (hooks) or replaced."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_models.modeling_zoo_common import FEW_ROWS, few_rows_linear


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
