"""torch.compile(qmodel, fullgraph=True) and torch.export: after one eager forward, a quantized model traces without
a graph break (each quantized matmul is one custom op, `kernels.ops`) and computes what the eager model computes."""
import pytest
import torch
from torch import nn

from allocator import Budget, allocate, load_quantized, save_quantized
from kernels import QuantSpec, quantize_module
from tiny import FAST, lm_batches, tiny_llama


def compiled_matches_eager(model: nn.Module, *inputs, **kwargs) -> torch.Tensor:
    """Run `model` eagerly (each quantized layer picks its backend), then compiled; assert 0 graph breaks and the
    same outputs; return them."""
    with torch.no_grad():
        eager = model(*inputs, **kwargs)
        eager = getattr(eager, "logits", eager)
        assert torch._dynamo.explain(model)(*inputs, **kwargs).graph_break_count == 0
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(*inputs, **kwargs)
        compiled = getattr(compiled, "logits", compiled)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    return compiled


def test_a_saved_and_reloaded_plan_compiles_with_fullgraph(tmp_path):
    model = tiny_llama()
    plan = allocate(model, lm_batches(2), Budget(avg_bits=4.0), bits=(2, 3, 4, 8), profiler_settings=FAST)
    save_quantized(plan.apply(model), tmp_path / "q")
    qmodel = load_quantized(tmp_path / "q")
    compiled_matches_eager(qmodel, input_ids=lm_batches(1)[0]["input_ids"], use_cache=False)


def test_convs_and_asymmetric_layers_compile_with_fullgraph():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1), nn.Flatten(),
                        nn.Linear(8 * 36, 10))
    qnet = nn.Sequential(quantize_module(net[0], QuantSpec(4, None)), net[1],
                         quantize_module(net[2], QuantSpec(8, None, symmetric=False)), net[3],
                         quantize_module(net[4], QuantSpec(3, 32, symmetric=False)))
    compiled_matches_eager(qnet, torch.randn(2, 8, 6, 6))


def test_compiling_before_the_first_forward_says_what_to_do():
    torch.manual_seed(0)
    qnet = nn.Sequential(quantize_module(nn.Linear(32, 16), QuantSpec(4, 32)))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="run the model once eagerly"):
        torch.compile(qnet, fullgraph=True, backend="aot_eager")(torch.randn(2, 32))


def test_torch_export_saves_a_program_that_runs_the_quantized_ops(tmp_path):
    torch.manual_seed(0)
    qnet = nn.Sequential(quantize_module(nn.Linear(32, 64), QuantSpec(4, 32)), nn.GELU(),
                         quantize_module(nn.Linear(64, 8), QuantSpec(3, 32, symmetric=False)))
    x = torch.randn(2, 32)
    eager = qnet(x)
    program = torch.export.export(qnet, (x,))
    assert "bitalloc.quantized_linear" in program.graph_module.code
    torch.export.save(program, tmp_path / "qnet.pt2")
    torch.testing.assert_close(torch.export.load(tmp_path / "qnet.pt2").module()(x), eager)
