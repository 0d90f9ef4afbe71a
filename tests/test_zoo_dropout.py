"""`ZooDropout`: on a CPU, dropout at p rounded to 16 bits from an opaque operator (eager and compiled), every
16-bit lane of its draws at the rate, and whole training forwards that still compile to one graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_models.modeling_zoo_common import ZooDropout, dropout_keep_threshold
from hf_models.registry import get_spec

from .conftest import tiny_model


def graph_recorder(graphs: list[str]):
    def backend(graph_module: torch.fx.GraphModule, example_inputs):
        graphs.append(graph_module.code)
        return graph_module.forward
    return backend


def test_cpu_zoo_dropout_drops_at_the_rounded_rate_in_every_lane_reproducibly_and_eval_is_the_identity():
    x = torch.randn(1000, 2001, requires_grad=True)  # an odd count: the last 64-bit draw is used in part
    dropout = ZooDropout(0.1).train()
    torch.manual_seed(3)
    y = dropout(x)
    torch.manual_seed(3)
    assert torch.equal(dropout(x), y)
    rate = dropout_keep_threshold(0.1) / 2**16
    assert rate == pytest.approx(0.1, abs=2**-17)
    y.sum().backward()  # the gradient is the multiplier: 0 where dropped, 1 / (1 - p') elsewhere
    dropped = x.grad == 0
    # each 64-bit draw serves four consecutive elements, one per 16-bit lane: every lane drops at the rate
    lanes = dropped.flatten()[: 4 * (dropped.numel() // 4)].view(-1, 4).float().mean(0)
    assert (lanes - rate).abs().max() < 3e-3, lanes  # 5e5 draws per lane: the standard error is 4e-4
    assert torch.equal(x.grad[~dropped], torch.full_like(x.grad[~dropped], 1 / (1 - rate)))
    torch.testing.assert_close(y, x * x.grad)
    assert torch.equal(dropout.eval()(x), x)


def test_the_dropout_rate_is_rounded_to_sixteen_bits_and_stays_below_one():
    assert dropout_keep_threshold(0.25) == 2**14
    assert dropout_keep_threshold(1e-9) == 0
    assert dropout_keep_threshold(1 - 1e-9) == 2**16 - 1


def test_zoo_dropout_outside_its_cpu_path_is_nn_dropout_here_at_p_one():
    x = torch.randn(64, 128)
    torch.manual_seed(3)
    expected = nn.Dropout(1.0).train()(x)  # p = 1 is nn.Dropout's own case (all zeros)
    assert torch.equal(ZooDropout(1.0).train()(x), expected)


def test_compiled_zoo_dropout_draws_its_mask_from_the_opaque_operator_with_dropouts_distribution():
    torch._dynamo.reset()
    graphs: list[str] = []
    dropout = ZooDropout(0.25).train()
    x = torch.randn(1000, 2000, requires_grad=True)
    y = torch.compile(dropout, backend=graph_recorder(graphs), fullgraph=True)(x)
    assert len(graphs) == 1 and "hf_zoo.dropout_scale" in graphs[0]
    y.sum().backward()  # the gradient is the multiplier: 0 where dropped, 1 / (1 - p) elsewhere
    multiplier = x.grad
    dropped = multiplier == 0
    assert abs(dropped.float().mean().item() - 0.25) < 3e-3  # 2e6 draws: the standard error is 3e-4
    assert torch.equal(multiplier[~dropped], torch.full_like(multiplier[~dropped], 1 / 0.75))
    torch.testing.assert_close(y, x * multiplier)
    torch._dynamo.reset()


@pytest.mark.parametrize("model_type", ["bicameral_lm", "toeplitz_mixer"])
def test_a_training_forward_with_dropout_compiles_to_one_graph(model_type):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = tiny_model(get_spec(model_type), dropout=0.2).train()
    ids = torch.randint(0, min(200, model.config.vocab_size), (2, 16))
    counter = CompileCounter()
    loss = torch.compile(lambda ids: model(ids, labels=ids).loss, backend=counter, fullgraph=True)(ids)
    loss.backward()
    assert counter.frame_count == 1 and torch.isfinite(loss)
    torch._dynamo.reset()
