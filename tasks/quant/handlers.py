"""One small handler per algorithm: what it does to each decoder layer (and, for QuaRot, to
the weights around the layers) while tasks.quant.layerwise streams the model through.

Layer structure follows the Llama family (Llama, Mistral, Qwen2, SmolLM): the projections are
self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj, behind input_layernorm and
post_attention_layernorm.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from tasks.errors import StageError
from tasks.quant.layerwise import Layer
from tasks.quant.memory import release_freed_memory
from tasks.quant.primitives import QuantizedLinear, QuantSpec, rtn_quantize

QP, KP, VP, OP = (f"self_attn.{p}_proj" for p in "qkvo")
GATE, UP, DOWN = (f"mlp.{p}_proj" for p in ("gate", "up", "down"))
# GPTQ's true-sequential order: each group sees the quantized outputs of the groups before it.
SEQUENTIAL = ((QP, KP, VP), (OP,), (GATE, UP), (DOWN,))


class _Stop(Exception):
    """Raised by a hook once every module it watches has seen its input: the rest of the
    layer's forward pass is not needed."""


def capture(layer: Layer, names: tuple[str, ...], on_input) -> None:
    """Run the layer's calibration inputs forward, calling on_input(name, x [tokens, in]) for
    each watched linear, and stop each batch as soon as all of them have been reached. Any
    linear of the layer can be watched, also one kept in float (AWQ reads their inputs)."""
    linears = {n: m for n, m in layer.module.named_modules() if isinstance(m, torch.nn.Linear)}
    seen: set[str] = set()

    def hook(name: str):
        def fn(module, args, output):
            on_input(name, args[0].reshape(-1, args[0].shape[-1]))
            seen.add(name)
            if len(seen) == len(names):
                raise _Stop

        return fn

    handles = [linears[n].register_forward_hook(hook(n)) for n in names]
    try:
        assert layer.inputs is not None
        with torch.no_grad():
            for batch in layer.inputs.split(4):
                seen.clear()
                with contextlib.suppress(_Stop):
                    layer.run(batch)
    finally:
        for h in handles:
            h.remove()


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether b is a, element for element the same memory (the caller holds a, so no other
    tensor can have been allocated at its address since)."""
    return (a.device, a.dtype, a.data_ptr(), a.shape, a.stride()) == (
        b.device, b.dtype, b.data_ptr(), b.shape, b.stride()
    )  # fmt: skip


def _set(linear: torch.nn.Linear, q: QuantizedLinear) -> QuantizedLinear:
    """Put the dequantized weight in place, so later layers see the quantized model."""
    linear.weight.data = q.dequantize().to(linear.weight.device, linear.weight.dtype)
    return q


@dataclass
class Identity:
    """No transform around the layers; subclasses quantize inside them."""

    def transform_ends(self, embed: torch.Tensor, norm: torch.Tensor, head: torch.Tensor | None):
        ends = {"model.embed_tokens.weight": embed, "model.norm.weight": norm}
        return ends | ({"lm_head.weight": head} if head is not None else {}), {}

    def transform_layer(
        self, index: int, weights: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return weights


@dataclass
class Rtn(Identity):
    spec: QuantSpec
    needs_data: bool = False

    def quantize_layer(self, layer: Layer) -> dict[str, QuantizedLinear]:
        return {
            n: _set(m, rtn_quantize(m.weight.data, self.spec)) for n, m in layer.linears().items()
        }


@dataclass
class Gptq(Identity):
    spec: QuantSpec
    damp_percent: float = 0.01
    act_order: bool = False
    true_sequential: bool = True
    static_groups: bool = False
    needs_data: bool = True

    def groups(self, names: list[str]) -> list[tuple[str, ...]]:
        """The linears to quantize, in turn; those kept in float are left out of the order."""
        if self.true_sequential and set(names) <= {n for g in SEQUENTIAL for n in g}:
            return [kept for g in SEQUENTIAL if (kept := tuple(n for n in g if n in names))]
        return [tuple(names)]

    def quantize_layer(self, layer: Layer) -> dict[str, QuantizedLinear]:
        from tasks.quant.gptq import add_to_hessian, gptq_quantize
        from tasks.quant.threads import token_gram

        linears, out = layer.linears(), {}
        for group in self.groups(list(linears)):
            hessians: dict[str, tuple[torch.Tensor | None, int]] = {n: (None, 0) for n in group}
            # (x, X^T X) of the last input seen: q, k and v (gate and up) read the very same
            # tensor, whose product is then computed once (the bytes are the same either way).
            last: list[torch.Tensor] = []

            def on_input(name: str, x: torch.Tensor, hessians=hessians, last=last) -> None:
                if not (last and _same_memory(last[0], x)):
                    last[:] = [x, token_gram(x)]
                h, count = hessians[name]
                hessians[name] = add_to_hessian(h, x, count, gram=last[1])

            capture(layer, group, on_input)
            last.clear()
            for name in group:
                w, h = linears[name].weight.data, hessians.pop(name)[0]  # free it once used
                try:
                    q = gptq_quantize(
                        w,
                        h,
                        self.spec,
                        damp_percent=self.damp_percent,
                        act_order=self.act_order,
                        static_groups=self.static_groups,
                    )
                except ValueError as err:
                    raise StageError(f"layer {layer.index} {name}: {err}") from None
                out[name] = _set(linears[name], q)
                release_freed_memory()  # the Hessian and its factors: up to 127 MB each
        return out


@dataclass
class Awq(Identity):
    """Activation-aware scaling (and clipping) of each layer's weights, then RTN.

    Scales are searched for each group of linears reading one input: the attention's q/k/v
    (behind input_layernorm), o (behind v, when v's outputs are o's inputs: not with grouped
    KV heads), gate/up (behind post_attention_layernorm) and down (behind up). Each scale is
    folded into what produces that input (a norm or a linear) so the float model is unchanged.
    """

    spec: QuantSpec
    grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    tokens: int = 2048  # calibration tokens the searches use per layer
    needs_data: bool = True

    def quantize_layer(self, layer: Layer) -> dict[str, QuantizedLinear]:
        from tasks.quant.awq import search_clip

        mod = layer.module
        lin = {n: m for n, m in mod.named_modules() if isinstance(m, torch.nn.Linear)}
        if not {QP, KP, VP, OP, GATE, UP, DOWN} <= set(lin):
            raise StageError(
                f"awq supports Llama-style layers (q/k/v/o, gate/up/down); layer {layer.index} has {sorted(lin)}"
            )
        inputs = self._inputs(layer, (QP, OP, GATE, DOWN))
        quantized = set(layer.linears())
        self._scale(inputs, QP, [QP, KP, VP], lin, quantized, norm=mod.input_layernorm)
        if lin[VP].out_features == lin[OP].in_features:
            self._scale(inputs, OP, [OP], lin, quantized, prev=lin[VP])
        self._scale(inputs, GATE, [GATE, UP], lin, quantized, norm=mod.post_attention_layernorm)
        self._scale(inputs, DOWN, [DOWN], lin, quantized, prev=lin[UP])
        readers = {QP: QP, KP: QP, VP: QP, OP: OP, GATE: GATE, UP: GATE, DOWN: DOWN}
        out = {}
        for name, linear in layer.linears().items():
            max_val = None
            if self.clip and name not in (QP, KP):  # as AWQ: q/k feed a softmax, clipping hurts
                max_val = search_clip(
                    linear.weight.data, inputs[readers[name]], self.spec, grid=self.grid
                )
            out[name] = _set(linear, rtn_quantize(linear.weight.data, self.spec, max_val))
        return out

    def _inputs(self, layer: Layer, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Each named linear's calibration inputs, at most TOKENS of them (a random subset: the
        searches average over tokens; more cost time on a CPU and gained nothing measurable)."""
        chunks: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        capture(layer, names, lambda name, x: chunks[name].append(x))
        generator = torch.Generator().manual_seed(layer.index)
        out = {}
        for name, parts in chunks.items():
            x = torch.cat(parts)
            keep = torch.randperm(len(x), generator=generator)[: self.tokens].to(x.device)
            out[name] = x[keep]
        return out

    def _scale(self, inputs, reader: str, names: list[str], lin, quantized: set[str],
               norm=None, prev=None) -> None:  # fmt: skip
        """Search scales for the linears reading one input (those kept in float do not count:
        their rounding error is none) and apply them to all of them, so the function stays."""
        from tasks.quant.awq import search_scales

        searched = [n for n in names if n in quantized]
        if not searched:
            return
        x = inputs[reader]
        s = search_scales(x, [lin[n].weight.data for n in searched], self.spec, grid=self.grid,
                          duo_scaling=self.duo_scaling)  # fmt: skip
        for n in names:
            lin[n].weight.data *= s  # W diag(s): reads x / s
        producer = norm.weight if norm is not None else prev.weight
        if norm is not None:
            producer.data /= s
        else:
            producer.data /= s[:, None]
            if prev.bias is not None:
                prev.bias.data /= s
        inputs[reader] = x / s


@dataclass
class Quarot(Identity):
    """QuaRot's rotation of the residual stream (and of each attention head's values) by
    randomised Hadamard matrices, fused into the weights: the float model computes the same
    function, but its weights lose their outlier channels, so they round better. Then the inner
    quantizer (GPTQ or RTN) runs on the rotated layers. Only the rotations that fold into
    weights are used: a checkpoint in a standard layout has no online Hadamard ops."""

    inner: Rtn | Gptq
    hidden_size: int
    head_dim: int
    seed: int = 0
    rotate_heads: bool = True

    def __post_init__(self) -> None:
        from tasks.quant.rotation import random_hadamard

        self.needs_data = self.inner.needs_data
        self.q = random_hadamard(self.hidden_size, self.seed)
        self.heads = random_hadamard(self.head_dim, self.seed + 1) if self.rotate_heads else None

    def transform_ends(self, embed: torch.Tensor, norm: torch.Tensor, head: torch.Tensor | None):
        from tasks.quant.rotation import fuse_and_rotate_ends

        return fuse_and_rotate_ends(embed, norm, head, self.q)

    def transform_layer(
        self, index: int, weights: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        from tasks.quant.rotation import fuse_layer_norms, rotate_layer

        return rotate_layer(fuse_layer_norms(weights), self.q, self.heads)

    def quantize_layer(self, layer: Layer) -> dict[str, QuantizedLinear]:
        return self.inner.quantize_layer(layer)
