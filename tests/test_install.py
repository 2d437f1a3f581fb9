"""Our top-level package is called `kernels`, like Hugging Face's hub-kernels package that transformers
probes for: installing bitalloc must not make transformers think that package is there."""

import importlib.metadata

import torch
import transformers
from transformers.utils.import_utils import is_kernels_available

import kernels


def test_transformers_does_not_mistake_our_kernels_for_hf_kernels():
    assert kernels.__file__.endswith("kernels/__init__.py")
    assert not hasattr(kernels, "get_kernel")
    assert is_kernels_available() is False


def test_transformers_builds_and_runs_models_with_ours_installed():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 64, (1, 8))).logits
    assert logits.shape == (1, 8, 64) and torch.isfinite(logits).all()


def test_console_script_is_declared():
    try:
        entry_points = importlib.metadata.distribution("bitalloc").entry_points
    except importlib.metadata.PackageNotFoundError:
        import pytest

        pytest.skip("bitalloc is not pip-installed in this environment (run `pip install -e .`)")
    assert any(ep.name == "bitalloc" and ep.value == "allocator.cli:main" for ep in entry_points)
