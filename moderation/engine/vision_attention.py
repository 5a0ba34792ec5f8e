"""Batched attention for Qwen3-VL's vision tower: one fused kernel per layer for all images of one size.

transformers' vision attention (without flash-attention) splits the packed patches of a batch into one
attention call per image, so a batch of 64 images makes 64 small kernel launches in each of the 27
layers. Images of the same size need no such split: their patches are consecutive blocks of equal length,
so they reshape into one (images, heads, patches, dim) batch. ``batch_vision_attention`` replaces each
layer's attention forward with that (runs of equal-length images batched, anything else per image as
before); tests/engine/test_vision_attention.py checks it against the original.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from moderation.engine.decoder import rotate_half

_PATCHED = "_moderation_batched_attention"


def batch_vision_attention(visual: Any, *, compile_rotary: bool = False) -> bool:
    """Patch every attention module of a Qwen3-VL vision tower in place; False if its layout is unknown.

    With ``compile_rotary`` the float32 rotary embedding (a dozen passes over q and k, ~25% of the
    tower's time at batch 128) runs as one fused kernel compiled by torch.compile.
    """
    blocks = getattr(visual, "blocks", None)
    if blocks is None:
        return False
    modules: list[Any] = [getattr(block, "attn", None) for block in blocks]
    if not modules or not all(_supported(m) for m in modules):
        return False
    rotary = torch.compile(_rotary, dynamic=True) if compile_rotary else _rotary
    for module in modules:
        if not getattr(module, _PATCHED, False):
            module.forward = partial(_batched_forward, module, module.forward, rotary)
            setattr(module, _PATCHED, True)
    return True


def _supported(module: Any) -> bool:
    return all(hasattr(module, name) for name in ("qkv", "proj", "num_heads", "scaling", "config"))


def _rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-VL's vision rotary embedding, in float32 as transformers computes it."""
    dtype = q.dtype
    q, k = q.float(), k.float()
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    return ((q * cos) + (rotate_half(q) * sin)).to(dtype), ((k * cos) + (rotate_half(k) * sin)).to(dtype)


def _batched_forward(
    module: Any,
    original: Any,
    rotary: Any,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *args: Any,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    implementation = getattr(module.config, "_attn_implementation", None)
    if args or position_embeddings is None or implementation not in (None, "sdpa", "eager"):
        return original(hidden_states, cu_seqlens, *args, position_embeddings=position_embeddings, **kwargs)
    seq_length = hidden_states.shape[0]
    q, k, v = (
        module.qkv(hidden_states).reshape(seq_length, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    )
    q, k = rotary(q, k, *position_embeddings)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    outputs = []
    start = 0
    index = 0
    while index < len(lengths):
        length, count = lengths[index], 1
        while index + count < len(lengths) and lengths[index + count] == length:
            count += 1
        end = start + length * count

        def chunk(t: torch.Tensor, start: int = start, end: int = end, count: int = count) -> torch.Tensor:
            return t[start:end].reshape(count, -1, module.num_heads, t.shape[-1]).transpose(1, 2)

        out = torch.nn.functional.scaled_dot_product_attention(
            chunk(q), chunk(k), chunk(v), scale=module.scaling
        )
        outputs.append(out.transpose(1, 2).reshape(end - start, -1))
        start, index = end, index + count
    attention = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
    return module.proj(attention)
