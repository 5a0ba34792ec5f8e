"""Greedy decoding of Qwen3-VL's text model over a static KV cache, replayed as CUDA graphs on a GPU.

The prompt (image and text) is prefilled by the transformers model itself; its key/value states are then
copied into preallocated per-layer buffers and every later token runs through this module's own loop over
the model's decoder layers (same weights, same submodules). That loop has fixed shapes and no host
synchronisation, so on CUDA one decode step is captured once per (batch, cache length) bucket and replayed:
the per-token Python overhead of ``generate`` (tens of milliseconds for a 36-layer model) disappears.

After the image, Qwen3-VL's multimodal RoPE gives all three position axes the same value for text tokens,
so text positions here are plain integers per row (``cache index + rope delta``), fed to the model's own
rotary embedding with the three axes equal.

Attention is grouped-query attention computed as two batched matrix products over the cache, with an
explicit mask: no key/value head is ever copied, and rows of different prompt lengths share one buffer.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LENGTH_BUCKET = 256
MAX_PREFIXES = 16
DONE_CHECK_EVERY = 16


def bucket(value: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``value`` (or ``value`` itself past the largest)."""
    return next((b for b in buckets if b >= value), value)


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple."""
    return -(-value // multiple) * multiple


@dataclass
class _State:
    """Static buffers of one (batch, length) bucket; a captured graph reads and writes only these."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor  # (B, L) bool: which cache slots each row may attend to
    token: torch.Tensor  # (B,) next input token
    position: torch.Tensor  # (B,) text position of that token
    write_index: torch.Tensor  # () cache slot the step writes
    out_tokens: torch.Tensor  # (B, max_steps) generated tokens
    step: torch.Tensor  # () index into out_tokens
    graph: Any = None


class StaticDecoder:
    """Runs decode steps and teacher-forced blocks over static buffers of the text model."""

    def __init__(
        self,
        model: Any,
        *,
        use_cuda_graphs: bool,
        suppress_ids: list[int],
        eos_ids: list[int],
        min_new_tokens: int = 0,
        compile_step: bool = False,
    ) -> None:
        self.lm = model.model.language_model
        self.lm_head = model.lm_head
        self.layers = list(self.lm.layers)
        config = self.lm.config
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.n_heads)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.device = self.lm_head.weight.device
        self.dtype = self.lm.embed_tokens.weight.dtype
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self._states: dict[tuple[int, int, int], _State] = {}
        self._prefixes: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._pool: Any = None
        self._suppress = (
            torch.tensor(suppress_ids, dtype=torch.long, device=self.device) if suppress_ids else None
        )
        self._eos = torch.tensor(eos_ids, dtype=torch.long, device=self.device)
        # Decode step s produces token s + 1; end-of-sequence is forbidden before token min_new_tokens.
        self._eos_allowed_from_step = torch.tensor(max(0, min_new_tokens - 1), device=self.device)
        # torch.compile fuses the many small kernels of a step (norms, rotary, activations) before capture.
        self._step_fn = torch.compile(self._step, dynamic=False) if compile_step else self._step

    # -- buffers ---------------------------------------------------------------------------------

    def _state(self, batch: int, length: int, max_steps: int) -> _State:
        key = (batch, length, max_steps)
        state = self._states.get(key)
        if state is None:
            # One bucket at a time: a new shape frees the previous buffers (graphs keep theirs in the pool).
            if not self.use_cuda_graphs:
                self._states.clear()
            shape = (batch, self.n_kv, length, self.head_dim)
            state = _State(
                keys=[torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers],
                values=[torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers],
                mask=torch.zeros(batch, length, dtype=torch.bool, device=self.device),
                token=torch.zeros(batch, dtype=torch.long, device=self.device),
                position=torch.zeros(batch, dtype=torch.long, device=self.device),
                write_index=torch.zeros((), dtype=torch.long, device=self.device),
                out_tokens=torch.zeros(batch, max_steps, dtype=torch.long, device=self.device),
                step=torch.zeros((), dtype=torch.long, device=self.device),
            )
            self._states[key] = state
        return state

    # -- the transformer, over the static cache ----------------------------------------------------

    def _forward(
        self,
        state: _State,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        mask: torch.Tensor,
        deepstack: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Hidden states of ``embeds`` (B, S, H) written at cache ``slots`` (S,), attending per ``mask`` (B, S, L).

        ``positions`` is (B, S) for text or (3, B, S) for M-RoPE; ``deepstack`` is the visual token mask
        (B, S) and the vision tower's per-layer features, added after the first layers as Qwen3-VL does.
        """
        batch, seq, _ = embeds.shape
        position_ids = positions if positions.dim() == 3 else positions.unsqueeze(0).expand(3, batch, seq)
        cos, sin = self.lm.rotary_emb(embeds, position_ids)
        kv_len = int(slots[-1]) + 1 if seq > 1 else mask.shape[-1]
        bias: torch.Tensor | None = None
        sdpa_mask: torch.Tensor | None = None
        if seq > 1:
            sdpa_mask = mask[:, :, :kv_len].unsqueeze(1)  # (B, 1, S, used slots)
        else:
            bias = torch.zeros(mask.shape, dtype=torch.float32, device=self.device)
            bias = bias.masked_fill_(~mask, float("-inf")).unsqueeze(1)  # (B, 1, 1, L): broadcast over heads
        groups = self.n_heads // self.n_kv
        hidden = embeds
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = attn.q_norm(attn.q_proj(x).view(batch, seq, self.n_heads, self.head_dim)).transpose(1, 2)
            k = attn.k_norm(attn.k_proj(x).view(batch, seq, self.n_kv, self.head_dim)).transpose(1, 2)
            v = attn.v_proj(x).view(batch, seq, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = _rotate(q, k, cos, sin)
            keys, values = state.keys[index], state.values[index]
            keys.index_copy_(2, slots, k.to(keys.dtype))
            values.index_copy_(2, slots, v.to(values.dtype))
            if bias is None:
                # Many queries (prefill, forced block): a fused kernel over the slots in use.
                out = torch.nn.functional.scaled_dot_product_attention(
                    q.to(keys.dtype),
                    keys[:, :, :kv_len],
                    values[:, :, :kv_len],
                    attn_mask=sdpa_mask,
                    scale=self.scale,
                    enable_gqa=True,
                )
            else:
                # One query (decode): (B, kv, groups, D) @ (B, kv, D, L) reads each cached key once per group.
                qg = q.reshape(batch, self.n_kv, groups * seq, self.head_dim)
                scores = torch.matmul(qg, keys.transpose(2, 3)).float() * self.scale
                scores = scores.view(batch, self.n_kv, groups, seq, -1) + bias.unsqueeze(2)
                probs = (
                    torch.softmax(scores, dim=-1).to(values.dtype).view(batch, self.n_kv, groups * seq, -1)
                )
                out = torch.matmul(probs, values).view(batch, self.n_heads, seq, self.head_dim)
            out = out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
            hidden = residual + attn.o_proj(out)
            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
            if deepstack is not None and index < len(deepstack[1]):
                visual_mask, features = deepstack
                hidden = hidden.clone()
                hidden[visual_mask] = hidden[visual_mask] + features[index].to(hidden.dtype)
        return self.lm.norm(hidden)

    def _step(self, state: _State) -> None:
        """One greedy decode step entirely on the device: reads and advances the state's tensors."""
        embeds = self.lm.embed_tokens(state.token).unsqueeze(1)
        slots = state.write_index.view(1)
        state.mask.index_fill_(1, slots, True)
        hidden = self._forward(state, embeds, state.position.unsqueeze(1), slots, state.mask.unsqueeze(1))
        logits = self.lm_head(hidden[:, -1]).float()
        if self._suppress is not None:
            logits.index_fill_(1, self._suppress, float("-inf"))
        penalty = torch.where(state.step < self._eos_allowed_from_step, float("-inf"), 0.0)
        logits.index_copy_(1, self._eos, logits.index_select(1, self._eos) + penalty)
        nxt = logits.argmax(dim=-1)
        state.out_tokens.index_copy_(1, state.step.view(1), nxt.unsqueeze(1))
        state.token.copy_(nxt)
        state.position.add_(1)
        state.write_index.add_(1)
        state.step.add_(1)

    def _capture(self, state: _State) -> Any:
        snapshot = [
            t.clone() for t in (state.token, state.position, state.write_index, state.step, state.mask)
        ]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._step_fn(state)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step_fn(state)
        self._pool = graph.pool()
        for target, saved in zip(
            (state.token, state.position, state.write_index, state.step, state.mask), snapshot, strict=True
        ):
            target.copy_(saved)
        return graph

    # -- public ------------------------------------------------------------------------------------

    def prefix_states(self, prefix_ids: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of a shared prompt prefix (text positions 0..P-1), computed once and kept."""
        cached = self._prefixes.get(prefix_ids)
        if cached is not None:
            self._prefixes.move_to_end(prefix_ids)
            return cached
        length = len(prefix_ids)
        shape = (1, self.n_kv, length, self.head_dim)
        scratch = _State(
            keys=[torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers],
            values=[torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers],
            mask=torch.ones(1, length, dtype=torch.bool, device=self.device),
            token=torch.zeros(1, dtype=torch.long, device=self.device),
            position=torch.zeros(1, dtype=torch.long, device=self.device),
            write_index=torch.zeros((), dtype=torch.long, device=self.device),
            out_tokens=torch.zeros(1, 1, dtype=torch.long, device=self.device),
            step=torch.zeros((), dtype=torch.long, device=self.device),
        )
        ids = torch.tensor([prefix_ids], dtype=torch.long, device=self.device)
        positions = torch.arange(length, device=self.device).unsqueeze(0)
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=self.device)).unsqueeze(0)
        slots = torch.arange(length, device=self.device)
        self._forward(scratch, self.lm.embed_tokens(ids), positions, slots, causal)
        cached = list(zip(scratch.keys, scratch.values, strict=True))
        self._prefixes[prefix_ids] = cached
        while len(self._prefixes) > MAX_PREFIXES:
            self._prefixes.popitem(last=False)
        return cached

    def prefill(
        self,
        prefix_ids: tuple[int, ...],
        suffix_ids: torch.Tensor,
        suffix_mask: torch.Tensor,
        positions: torch.Tensor,
        visual_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        deepstack: list[torch.Tensor],
        *,
        max_new_tokens: int,
        extra_slots: int,
    ) -> tuple[_State, torch.Tensor]:
        """Fill the cache with a shared prefix and each row's suffix (image, caption); last hidden state per row.

        Rows are laid out as [prefix][left padding][suffix]; ``positions`` (3, B, S) are the suffix's M-RoPE
        positions, continuing from the prefix's length.
        """
        real_batch, seq = suffix_ids.shape
        prefix_len = len(prefix_ids)
        batch = bucket(real_batch, BATCH_BUCKETS) if self.use_cuda_graphs else real_batch
        length = round_up(prefix_len + seq + max_new_tokens + extra_slots, LENGTH_BUCKET)
        state = self._state(batch, length, max_new_tokens)
        state.mask.zero_()
        state.mask[:, :prefix_len] = True
        state.mask[:real_batch, prefix_len : prefix_len + seq] = suffix_mask.bool()
        for (k, v), keys, values in zip(
            self.prefix_states(prefix_ids), state.keys, state.values, strict=True
        ):
            keys[:, :, :prefix_len].copy_(k.expand(batch, -1, -1, -1))
            values[:, :, :prefix_len].copy_(v.expand(batch, -1, -1, -1))
        embeds = self.lm.embed_tokens(suffix_ids)
        embeds[visual_mask] = image_embeds.to(embeds.dtype)
        slots = torch.arange(prefix_len, prefix_len + seq, device=self.device)
        causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool, device=self.device))
        mask = state.mask[:real_batch].unsqueeze(1).expand(real_batch, seq, -1).clone()
        mask[:, :, prefix_len : prefix_len + seq] &= causal.unsqueeze(0)
        mask[:, :, 0] |= ~mask.any(dim=-1)  # padding queries still need one visible key
        rows = _rows(state, real_batch)
        hidden = self._forward(rows, embeds, positions, slots, mask, (visual_mask, deepstack))
        state.write_index.fill_(prefix_len + seq)
        return state, hidden[:, -1]

    def decode(
        self,
        state: _State,
        first_token: torch.Tensor,
        next_positions: torch.Tensor,
        *,
        max_new_tokens: int,
        min_new_tokens: int,
    ) -> tuple[torch.Tensor, int]:
        """Greedy-decode after ``prefill``; the tokens (B, steps + 1) and the first free cache slot."""
        real_batch = first_token.shape[0]
        batch = state.token.shape[0]
        start = int(state.write_index.item())
        if batch > real_batch:  # padding rows attend to one slot so their softmax stays finite
            state.mask[real_batch:, 0] = True
        state.token.zero_()
        state.token[:real_batch] = first_token
        state.position.zero_()
        state.position[:real_batch] = next_positions
        state.step.zero_()
        state.out_tokens.zero_()
        steps = max_new_tokens - 1  # the prefill already produced the first token
        ran = 0
        if self.use_cuda_graphs and state.graph is None:
            state.graph = self._capture(state)
        for ran in range(1, steps + 1):
            if state.graph is not None:
                state.graph.replay()
            else:
                self._step(state)
            if ran >= min_new_tokens and ran % DONE_CHECK_EVERY == 0:
                produced = torch.cat([first_token.view(-1, 1), state.out_tokens[:real_batch, :ran]], dim=1)
                if bool(torch.isin(produced, self._eos).any(dim=1).all()):
                    break
        tokens = torch.cat([first_token.view(-1, 1), state.out_tokens[:real_batch, :ran]], dim=1)
        return tokens, start + ran

    def teacher_force(
        self,
        state: _State,
        block_ids: torch.Tensor,
        block_mask: torch.Tensor,
        generated_keep: torch.Tensor,
        start_slot: int,
        start_positions: torch.Tensor,
        prompt_len: int,
    ) -> torch.Tensor:
        """Run a forced block (B, S) after each row's kept generated tokens; returns its hidden states."""
        real_batch, seq = block_ids.shape
        # Rows see their prompt, the generated tokens they keep, and the block causally.
        visible = state.mask[:real_batch].clone()
        generated = visible[:, prompt_len:start_slot]
        generated.copy_(generated_keep[:, : generated.shape[1]])
        slots = torch.arange(start_slot, start_slot + seq, device=self.device)
        mask = visible.unsqueeze(1).expand(real_batch, seq, -1).clone()
        causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool, device=self.device))
        mask[:, :, start_slot : start_slot + seq] = causal.unsqueeze(0) & block_mask.bool().unsqueeze(1)
        # Padding tokens of a shorter block still need one visible key.
        mask[:, :, 0] |= ~mask.any(dim=-1)
        positions = start_positions.view(-1, 1) + torch.arange(seq, device=self.device).view(1, -1)
        embeds = self.lm.embed_tokens(block_ids)
        return self._forward(_rows(state, real_batch), embeds, positions, slots, mask)


def _rows(state: _State, real_batch: int) -> _State:
    """A view of the first ``real_batch`` rows of a state's cache (bucket padding rows left out)."""
    return _State(
        keys=[k[:real_batch] for k in state.keys],
        values=[v[:real_batch] for v in state.values],
        mask=state.mask[:real_batch],
        token=state.token,
        position=state.position,
        write_index=state.write_index,
        out_tokens=state.out_tokens,
        step=state.step,
    )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)
