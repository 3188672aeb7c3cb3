"""QuaRot rotations: orthogonality of the constructions, and unchanged logits once fused."""

from __future__ import annotations

import pytest
import torch

from tasks.quant.rotation import (
    fuse_and_rotate_ends,
    fuse_layer_norms,
    hadamard,
    random_hadamard,
    rotate_layer,
    rotate_state_dict,
)


@pytest.mark.parametrize("n", [12, 20, 28, 36, 40, 48, 64, 576])
def test_hadamard_constructions(n):
    h = hadamard(n)
    assert h is not None and set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [64, 576, 12, 20, 40, 10])
def test_random_hadamard_is_orthogonal(n):
    q = random_hadamard(n, seed=3)
    assert q.dtype == torch.float64
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64))
    assert torch.equal(q, random_hadamard(n, seed=3))
    assert not torch.equal(q, random_hadamard(n, seed=4))


def test_no_hadamard_falls_back_to_random_orthogonal():
    assert hadamard(10) is None and hadamard(52) is None


def tiny_llama(hidden: int, tied: bool, bias: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 8,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        attention_bias=bias,
        mlp_bias=bias,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norm weights, so folding them is actually tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5)
    return model


def rotated_logits(model, head_rotation: bool, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    config = model.config
    state = dict(model.state_dict())
    if config.tie_word_embeddings:
        del state["lm_head.weight"]  # as in the checkpoint of a tied model
    head_dim = config.hidden_size // config.num_attention_heads
    r = random_hadamard(head_dim, seed=1) if head_rotation else None
    new_state, updates = rotate_state_dict(
        state, config.num_hidden_layers, random_hadamard(config.hidden_size, seed=0), r
    )
    assert updates == {"tie_word_embeddings": False}
    new_config = type(config).from_dict({**config.to_dict(), **updates})
    rotated = LlamaForCausalLM(new_config).eval()
    rotated.load_state_dict(new_state, strict=True)
    assert not torch.allclose(
        rotated.model.layers[0].self_attn.q_proj.weight,
        model.model.layers[0].self_attn.q_proj.weight,
    )
    with torch.no_grad():
        return rotated(tokens).logits


@pytest.mark.parametrize("head_rotation", [False, True])
@pytest.mark.parametrize(
    ("hidden", "tied", "bias"), [(64, False, False), (48, True, False), (40, True, True)]
)
def test_rotation_keeps_logits(hidden, tied, bias, head_rotation):
    """48: hidden 4·12 and head_dim 12 (Paley); 40: head_dim 10 has no Hadamard (fallback)."""
    model = tiny_llama(hidden, tied, bias)
    tokens = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens).logits
    got = rotated_logits(model, head_rotation, tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_tiny_model_fixture(tiny_model):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    tokens = torch.arange(20)[None]
    with torch.no_grad():
        expected = model(tokens).logits
    torch.testing.assert_close(rotated_logits(model, True, tokens), expected, atol=1e-4, rtol=1e-4)


def test_layer_functions_keep_dtype_and_are_pure():
    gen = torch.Generator().manual_seed(0)
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    layer = {
        f"{'self_attn' if n[0] in 'qkvo' else 'mlp'}.{n}.weight": torch.randn(8, 8, generator=gen)
        for n in names
    }
    layer |= {
        "input_layernorm.weight": torch.rand(8),
        "post_attention_layernorm.weight": torch.rand(8),
    }
    layer = {k: v.bfloat16() for k, v in layer.items()}
    before = {k: v.clone() for k, v in layer.items()}
    out = rotate_layer(fuse_layer_norms(layer), random_hadamard(8), random_hadamard(4))
    assert all(torch.equal(layer[k], before[k]) for k in layer)  # inputs untouched
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    assert (out["input_layernorm.weight"] == 1).all()
    ends, updates = fuse_and_rotate_ends(
        layer["mlp.up_proj.weight"], torch.rand(8), None, random_hadamard(8)
    )
    assert set(ends) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert updates == {"tie_word_embeddings": False}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rotation_on_cuda():
    model = tiny_llama(48, tied=True)
    state = {k: v.cuda() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    new_state, _ = rotate_state_dict(state, 2, random_hadamard(48), random_hadamard(12))
    assert all(v.is_cuda and v.dtype == torch.float32 for v in new_state.values())
