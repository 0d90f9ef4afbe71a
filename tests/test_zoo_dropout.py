"""`ZooDropout`: nn.Dropout's distribution in eager and compiled training, the mask from an opaque operator when
compiled on a CPU, and whole training forwards that still compile to one graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_models.modeling_zoo_common import ZooDropout
from hf_models.registry import get_spec

from .conftest import tiny_model


def graph_recorder(graphs: list[str]):
    def backend(graph_module: torch.fx.GraphModule, example_inputs):
        graphs.append(graph_module.code)
        return graph_module.forward
    return backend


def test_eager_zoo_dropout_is_nn_dropout_and_eval_is_the_identity():
    x = torch.randn(64, 128)
    torch.manual_seed(3)
    expected = nn.Dropout(0.3).train()(x)
    torch.manual_seed(3)
    assert torch.equal(ZooDropout(0.3).train()(x), expected)
    assert torch.equal(ZooDropout(0.3).eval()(x), x)


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
