"""The layer-streaming runner: it reads what safetensors holds and runs layers as the model does."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from tasks.quant.layerwise import WeightReader, _layer_runner


def test_reader_returns_what_safetensors_wrote(tmp_path):
    tensors = {
        "a": torch.randn(3, 5, dtype=torch.bfloat16),
        "b": torch.randn(7, dtype=torch.float16),
        "c": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "d": torch.randn(4, 4),
    }
    save_file(dict(list(tensors.items())[:2]), tmp_path / "model-1.safetensors")
    save_file(dict(list(tensors.items())[2:]), tmp_path / "model-2.safetensors")
    reader = WeightReader(tmp_path)
    assert sorted(reader.names()) == ["a", "b", "c", "d"]
    for name, tensor in tensors.items():
        got = reader.get(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor)


def test_layers_run_alone_reproduce_the_models_hidden_states(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states
        run = _layer_runner(model, model.config, 24, torch.device("cpu"))
        hidden = model.model.embed_tokens(ids)
        hidden = run(model.model.layers[0], hidden)
    # hidden_states[1] is the output of the first layer (the last entry is after the final norm).
    assert torch.allclose(hidden, want[1], atol=1e-5)
