"""QuaRot (Ashkboos et al., 2024): rotate a Llama's residual stream by an orthogonal Q so
outlier channels spread out before quantization, with every rotation fused into the weights.

RMSNorm without its weight commutes with Q (it only divides by the norm), so once each norm's
weight is folded into the linears that read it, embed ← E Q, readers ← W Q, writers ← Qᵀ W and
the head ← W Q give the same logits. Optionally v_proj's per-head outputs and o_proj's per-head
inputs take a head_dim rotation too (fusable; QuaRot's online Hadamards are not done here).

Layer functions take ONE decoder layer's tensors keyed as in that layer's state dict
("input_layernorm.weight", "self_attn.q_proj.weight", "mlp.down_proj.weight", ...), so a
runner can stream layers; rotate_state_dict applies everything to a whole state dict. The maths
is in float64, results in each tensor's own dtype and device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "fuse_and_rotate_ends",
    "fuse_layer_norms",
    "hadamard",
    "random_hadamard",
    "rotate_layer",
    "rotate_state_dict",
]

Tensors = dict[str, torch.Tensor]
_READERS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}


def _is_prime(p: int) -> bool:
    return p > 1 and all(p % d for d in range(2, int(p**0.5) + 1))


def _jacobsthal(p: int) -> torch.Tensor:
    """Q[i, j] = χ(j - i), χ the Legendre symbol mod the prime p."""
    squares = {(k * k) % p for k in range(1, p)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, p)])
    idx = torch.arange(p)
    return chi[(idx[None, :] - idx[:, None]) % p].double()


def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m by Paley I (m = p + 1, p ≡ 3 mod 4) or Paley II
    (m = 2(p + 1), p ≡ 1 mod 4), p prime; None if neither applies."""
    p = m - 1
    if _is_prime(p) and p % 4 == 3:
        # I + S, S the skew conference matrix [[0, 1ᵀ], [-1, Q]].
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(p)
        return s + torch.eye(m, dtype=torch.float64)
    p = m // 2 - 1
    if m % 2 == 0 and _is_prime(p) and p % 4 == 1:
        # C ⊗ [[1, -1], [-1, -1]] + I ⊗ [[1, 1], [1, -1]], C the symmetric conference matrix.
        c = torch.zeros(m // 2, m // 2, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(p)
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(m // 2, dtype=torch.float64), b)
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order n (H Hᵀ = n I, float64) as Sylvester's 2^k times a Paley
    order m (n = 2^k·m: 12, 20, 28, 36, 40, 72, ... and 576 = 16·36); None if none is known."""
    base = None
    for k in range(n.bit_length() - 1, -1, -1):  # the smallest Paley factor first
        if n % 2**k == 0:
            base = torch.ones(1, 1, dtype=torch.float64) if n == 2**k else _paley(n // 2**k)
            if base is not None:
                break
    if base is None:
        return None
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while base.shape[0] < n:
        base = torch.kron(h2, base)
    return base


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal [n, n] float64 matrix H·diag(±1)/√n, the signs drawn from seed.

    Without a known Hadamard order (see hadamard; e.g. n = 10, 52) it falls back to a seeded
    random orthogonal matrix (QR of a Gaussian, signs fixed so it is Haar-distributed): still
    exact for fusion, but it spreads outliers less evenly than a Hadamard.
    """
    gen = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is None:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diag(r))
    signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    return h * signs / n**0.5


def _apply(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fn on t in float64, back in t's dtype."""
    return fn(t.double()).to(t.dtype)


def fuse_layer_norms(layer: Tensors) -> Tensors:
    """Fold input_layernorm into q, k, v and post_attention_layernorm into gate, up (W diag(g));
    both norm weights become ones. Returns a new dict."""
    out = dict(layer)
    for norm, readers in _READERS.items():
        g = layer[f"{norm}.weight"].double()
        for name in readers:
            key = f"{name}.weight"
            out[key] = _apply(layer[key], lambda w, g=g: w * g.to(w.device))
        out[f"{norm}.weight"] = torch.ones_like(layer[f"{norm}.weight"])
    return out


def rotate_layer(
    layer: Tensors, q: torch.Tensor, head_rotation: torch.Tensor | None = None
) -> Tensors:
    """Rotate one (norm-fused) decoder layer by the residual rotation q [hidden, hidden]:
    readers (q, k, v, gate, up) W ← W Q, writers (o, down) W ← Qᵀ W.

    head_rotation [head_dim, head_dim], optional: every v_proj head's output rows ← Rᵀ W_v and
    every o_proj head's input columns ← W_o R. Attention mixes v only within a head, so this is
    exact; with GQA each kv head feeds several query heads, hence one R for all heads.
    """
    out = dict(layer)
    for name in (*_READERS["input_layernorm"], *_READERS["post_attention_layernorm"]):
        key = f"{name}.weight"
        out[key] = _apply(layer[key], lambda w: w @ q.to(w.device, torch.float64))
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        key = f"{name}.weight"
        out[key] = _apply(layer[key], lambda w: q.to(w.device, torch.float64).T @ w)
        if f"{name}.bias" in layer:  # the bias is part of the output: Qᵀ b
            out[f"{name}.bias"] = _apply(
                layer[f"{name}.bias"], lambda b: b @ q.to(b.device, b.dtype)
            )
    if head_rotation is not None:
        _rotate_heads(out, head_rotation)
    return out


def _rotate_heads(layer: Tensors, r: torch.Tensor) -> None:
    """Per-head rotation of v_proj outputs and o_proj inputs, in place on the dict."""
    d = r.shape[0]

    def v_fn(w: torch.Tensor) -> torch.Tensor:  # [kv_heads·d, hidden]
        return (r.to(w.device, torch.float64).T @ w.reshape(-1, d, w.shape[1])).reshape(w.shape)

    def o_fn(w: torch.Tensor) -> torch.Tensor:  # [hidden, heads·d]
        return (w.reshape(w.shape[0], -1, d) @ r.to(w.device, torch.float64)).reshape(w.shape)

    for key, fn in (("self_attn.v_proj.weight", v_fn), ("self_attn.o_proj.weight", o_fn)):
        layer[key] = _apply(layer[key], fn)
    if "self_attn.v_proj.bias" in layer:  # Rᵀ b per head, written as rows: b R
        layer["self_attn.v_proj.bias"] = _apply(
            layer["self_attn.v_proj.bias"], lambda b: o_fn(b[None])[0]
        )


def fuse_and_rotate_ends(
    embed: torch.Tensor, norm: torch.Tensor, lm_head: torch.Tensor | None, q: torch.Tensor
) -> tuple[Tensors, dict[str, object]]:
    """The model's ends: embed ← E Q, lm_head ← W diag(norm) Q, norm ← ones.

    lm_head None means tied to embed. The fused head differs from the rotated embedding, so the
    result always carries its own lm_head; returns (tensors by full state-dict name, config
    updates the caller must apply: {"tie_word_embeddings": False}).
    """
    head = embed if lm_head is None else lm_head
    qd = q.to(embed.device, torch.float64)
    tensors = {
        "model.embed_tokens.weight": _apply(embed, lambda e: e @ qd),
        "model.norm.weight": torch.ones_like(norm),
        "lm_head.weight": _apply(head, lambda w: (w * norm.double().to(w.device)) @ qd),
    }
    return tensors, {"tie_word_embeddings": False}


def rotate_state_dict(
    state: Tensors,
    num_layers: int,
    q: torch.Tensor,
    head_rotation: torch.Tensor | None = None,
) -> tuple[Tensors, dict[str, object]]:
    """Fuse norms and rotate a whole LlamaForCausalLM state dict, layer by layer; a missing
    lm_head.weight means tied embeddings. Returns (new state dict, config updates)."""
    out, config = fuse_and_rotate_ends(
        state["model.embed_tokens.weight"],
        state["model.norm.weight"],
        state.get("lm_head.weight"),
        q,
    )
    for i in range(num_layers):
        prefix = f"model.layers.{i}."
        layer = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        layer = rotate_layer(fuse_layer_norms(layer), q, head_rotation)
        out.update({prefix + k: v for k, v in layer.items()})
    rest = {k: v for k, v in state.items() if k not in out and not k.startswith("model.layers.")}
    return {**rest, **out}, config
