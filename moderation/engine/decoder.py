"""Greedy decoding of Qwen3-VL's text model over a static KV cache, replayed as CUDA graphs on a GPU.

Every submission of a batch starts with the same instruction prefix (system message and the user turn's
header). Its keys and values are computed once per distinct prefix and stored once per layer; the per-row
cache holds only each row's suffix (image, quoted caption), the generated tokens and the forced answer
block. Attention over a row is one softmax over [shared prefix | row slots]: the prefix's scores for all
rows come from one matrix product against the single copy, so no prefix key is copied or read per row.

The suffix is prefilled through this module's own loop over the model's decoder layers (same weights, same
submodules). Decode steps have fixed shapes and no host synchronisation, so on CUDA one step is captured
once per (batch, cache length, attention window) and replayed: the per-token Python overhead of
``generate`` (tens of milliseconds for a 36-layer model) disappears, and a step reads only the window of
row slots in use (a multiple of ``WINDOW``), not the whole preallocated cache.

After the image, Qwen3-VL's multimodal RoPE gives all three position axes the same value for text tokens,
so text positions here are plain integers per row (``cache index + rope delta``), fed to the model's own
rotary embedding with the three axes equal.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moderation.engine.scoring import ReplyEndTokens

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LENGTH_BUCKET = 256
#: Decode steps attend to the row slots in use rounded up to this many (one captured graph per window).
WINDOW = 64
#: Prefix buffers grow in steps of this many tokens.
PREFIX_BUCKET = 128
MAX_PREFIXES = 16
RECOMPILE_LIMIT = 256
#: Eager steps run on a state's buffers before a graph is captured (their writes are undone or overwritten).
CAPTURE_WARMUP_STEPS = 3
DONE_CHECK_EVERY = 16


def bucket(value: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``value`` (or ``value`` itself past the largest)."""
    return next((b for b in buckets if b >= value), value)


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple."""
    return -(-value // multiple) * multiple


class ReplyEnd:
    """Where each generated reply ends: an end-of-sequence token, or the blank line after its explanation line.

    The engine forces its own answer block after the three labelled lines, so the model's own answers (and
    anything else after the blank line that closes the explanation line) would be decoded for nothing. The
    explanation label counts only at the start of a line (markdown such as ``**`` or ``-`` allowed) and
    followed by a colon, and the blank line must come after at least one token of the explanation, so
    neither "Explanation of terms" nor "解释权归本公司所有" in the visible text ends a reply.
    """

    def __init__(
        self, eos_ids: list[int], tokens: ReplyEndTokens | None, *, device: torch.device, min_tokens: int = 0
    ) -> None:
        def ids(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        self.eos = ids(eos_ids)
        self.tokens = tokens
        if tokens is not None:
            self.blank_line, self.line_end = ids(tokens.blank_line), ids(tokens.line_end)
            self.line_start, self.labels = ids(tokens.line_start), ids(tokens.labels)
            self.decorations, self.colons = ids(tokens.decorations), ids(tokens.colons)
        self.min_tokens = min_tokens

    def first_stop(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per row of ``tokens`` (B, T), the index of the token that ends the reply, or T when none does."""
        stop = torch.isin(tokens, self.eos)
        if self.tokens is not None and self.tokens.labels and self.tokens.blank_line:
            length = tokens.shape[1]
            position = torch.arange(length, device=tokens.device).expand_as(tokens)
            line_end = torch.isin(tokens, self.line_end)
            plain = ~torch.isin(tokens, self.decorations)  # not markdown or spaces
            # The nearest token before / after each position that is not markdown or spaces.
            last_plain = torch.where(plain, position, -1).cummax(dim=1).values
            before = torch.full_like(last_plain, -1)
            before[:, 1:] = last_plain[:, :-1]
            next_plain = torch.where(plain, position, length).flip(1).cummin(dim=1).values.flip(1)
            after = torch.full_like(next_plain, length)
            after[:, :-1] = next_plain[:, 1:]
            starts_line = torch.where(before < 0, True, line_end.gather(1, before.clamp(min=0)))
            colon = torch.isin(tokens, self.colons)
            colon_next = torch.where(after < length, colon.gather(1, after.clamp(max=length - 1)), False)
            label = torch.isin(tokens, self.labels) & starts_line & colon_next
            # A blank line ends the reply from the second token after the label's colon on: the colon token
            # may hold a blank line itself ("Explanation:\n\n..."), and the explanation needs a word.
            enabled_from = torch.where(label, after + 2, length + 2).cummin(dim=1).values
            blank = torch.isin(tokens, self.blank_line)
            blank[:, 1:] |= line_end[:, :-1] & torch.isin(tokens[:, 1:], self.line_start)  # split over two
            blank &= position >= enabled_from
            if self.min_tokens > 0:  # benchmarks force a length; end-of-sequence is masked before it too
                blank[:, : self.min_tokens] = False
            stop |= blank
        last = torch.full_like(stop[:, 0], tokens.shape[1], dtype=torch.long)
        return torch.where(stop.any(dim=1), stop.float().argmax(dim=1), last)


@dataclass
class _State:
    """Static buffers of one (batch, length) bucket; a captured graph reads and writes only these."""

    keys: list[torch.Tensor]  # per layer (B, kv, L, D): row slots
    values: list[torch.Tensor]
    prefix_keys: list[torch.Tensor]  # per layer (1, kv, P_cap, D): the shared prefix, once
    prefix_values: list[torch.Tensor]
    prefix_bias: torch.Tensor  # (P_cap,) float32: 0 for the prefix's tokens, -inf for unused capacity
    mask: torch.Tensor  # (B, L) bool: which row slots each row may attend to
    token: torch.Tensor  # (B,) next input token
    position: torch.Tensor  # (B,) text position of that token
    write_index: torch.Tensor  # () row slot the step writes
    out_tokens: torch.Tensor  # (B, max_steps) generated tokens
    step: torch.Tensor  # () index into out_tokens
    prefix_len: int = 0
    graphs: dict[int, Any] = field(default_factory=dict)  # attention window -> captured decode step

    @property
    def nbytes(self) -> int:
        """Device memory its buffers take (its graphs' work memory lives in the decoder's shared pool)."""
        tensors = [*self.keys, *self.values, *self.prefix_keys, *self.prefix_values]
        tensors += [self.prefix_bias, self.mask, self.token, self.position, self.write_index]
        tensors += [self.out_tokens, self.step]
        return sum(t.numel() * t.element_size() for t in tensors)


class StaticDecoder:
    """Runs prefill, decode steps and teacher-forced blocks over static buffers of the text model."""

    def __init__(
        self,
        model: Any,
        *,
        use_cuda_graphs: bool,
        suppress_ids: list[int],
        eos_ids: list[int],
        min_new_tokens: int = 0,
        compile_step: bool = False,
        state_budget_bytes: int = 0,
        reply_end: ReplyEnd | None = None,
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
        # Buffers (and graphs) per (batch, length, steps) bucket, least recently used first. Shapes vary with
        # images and captions, so they are kept only within a byte budget: beyond it the oldest are freed
        # (recaptured if that shape comes back). Without graphs, buffers are cheap to make: only the one
        # in use is kept.
        self._states: OrderedDict[tuple[int, int, int], _State] = OrderedDict()
        self.state_budget_bytes = state_budget_bytes if self.use_cuda_graphs else 0
        self._prefixes: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._pool: Any = None
        self._suppress = (
            torch.tensor(suppress_ids, dtype=torch.long, device=self.device) if suppress_ids else None
        )
        self._eos = torch.tensor(eos_ids, dtype=torch.long, device=self.device)
        self.reply_end = reply_end or ReplyEnd(eos_ids, None, device=self.device)
        # Decode step s produces token s + 1; end-of-sequence is forbidden before token min_new_tokens.
        self._eos_allowed_from_step = torch.tensor(max(0, min_new_tokens - 1), device=self.device)
        self.eps = float(config.rms_norm_eps)
        self._weights = [_layer_weights(layer, config) for layer in self.layers]
        plain = all(w is None or isinstance(w, torch.Tensor) for weights in self._weights for w in weights)
        # torch.compile fuses the many small kernels of a layer (norms, rotary, softmax, activations). The
        # compiled functions take every weight as an argument, so one compilation serves all 36 layers (and,
        # with dynamic shapes, every batch, prompt length and attention window): seconds, not minutes.
        compiled = compile_step and plain
        self._attention_inputs: Callable[..., Any] = (
            _compiled(_attention_inputs) if compiled else _attention_inputs
        )
        self._output_and_mlp: Callable[..., Any] = _compiled(_output_and_mlp) if compiled else _output_and_mlp
        # The decode attention is compiled per shape (batch bucket, window, prefix capacity): its softmax
        # reductions are 1.7x faster with sizes known than with symbolic ones, and each compile takes < 1 s.
        self._grouped_attention: Callable[..., Any] = (
            _compiled(_grouped_attention, dynamic=False) if compiled else _grouped_attention
        )

    # -- buffers ---------------------------------------------------------------------------------

    def _kv(self, batch: int, length: int) -> list[torch.Tensor]:
        shape = (batch, self.n_kv, length, self.head_dim)
        return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]

    def _new_state(self, batch: int, length: int, max_steps: int, prefix_capacity: int) -> _State:
        return _State(
            keys=self._kv(batch, length),
            values=self._kv(batch, length),
            prefix_keys=self._kv(1, prefix_capacity),
            prefix_values=self._kv(1, prefix_capacity),
            prefix_bias=torch.full((prefix_capacity,), float("-inf"), device=self.device),
            mask=torch.zeros(batch, length, dtype=torch.bool, device=self.device),
            token=torch.zeros(batch, dtype=torch.long, device=self.device),
            position=torch.zeros(batch, dtype=torch.long, device=self.device),
            write_index=torch.zeros((), dtype=torch.long, device=self.device),
            # Spare columns: capturing a graph mid-decode runs a few real warm-up steps past the current one.
            out_tokens=torch.zeros(
                batch, max_steps + CAPTURE_WARMUP_STEPS, dtype=torch.long, device=self.device
            ),
            step=torch.zeros((), dtype=torch.long, device=self.device),
        )

    def _state(self, batch: int, length: int, max_steps: int, prefix_len: int) -> _State:
        key = (batch, length, max_steps)
        state = self._states.get(key)
        if state is not None and state.prefix_keys[0].shape[2] < prefix_len:
            # A longer prefix than this bucket has seen: new buffers, and graphs that read them.
            self._drop(key)
            state = None
        if state is None:
            # Free what the budget cannot hold before allocating, so the new buffers can reuse that memory.
            self._evict_for(self._state_bytes(batch, length, max_steps, prefix_len))
            state = self._new_state(batch, length, max_steps, round_up(max(prefix_len, 1), PREFIX_BUCKET))
            self._states[key] = state
        self._states.move_to_end(key)
        return state

    def _state_bytes(self, batch: int, length: int, max_steps: int, prefix_len: int) -> int:
        """What ``_new_state`` will allocate for this bucket (its KV buffers; the rest is small)."""
        per_token = 2 * len(self.layers) * self.n_kv * self.head_dim * self.dtype.itemsize
        return per_token * (batch * length + round_up(max(prefix_len, 1), PREFIX_BUCKET))

    def _evict_for(self, incoming: int) -> None:
        """Free the least recently used buckets until ``incoming`` more bytes fit in the budget."""
        held = self.held_state_bytes
        while self._states and held + incoming > self.state_budget_bytes:
            oldest = next(iter(self._states))
            held -= self._states[oldest].nbytes
            self._drop(oldest)

    def _drop(self, key: tuple[int, int, int]) -> None:
        """Free one bucket's buffers and graphs."""
        del self._states[key]
        if not any(state.graphs for state in self._states.values()):
            # The graphs' shared memory pool dies with its last graph: PyTorch refuses to capture into it
            # again (an internal assertion), so the next capture starts a new pool.
            self._pool = None

    def forget_all(self) -> None:
        """Free every bucket's buffers and graphs."""
        for key in list(self._states):
            self._drop(key)

    @property
    def held_state_bytes(self) -> int:
        """Device memory the kept buckets' buffers take."""
        return sum(state.nbytes for state in self._states.values())

    def _load_prefix(self, state: _State, prefix_ids: tuple[int, ...]) -> None:
        """Copy a prefix's keys and values into the state's prefix buffers (in place: graphs keep reading them)."""
        length = len(prefix_ids)
        for (k, v), keys, values in zip(
            self.prefix_states(prefix_ids), state.prefix_keys, state.prefix_values, strict=True
        ):
            keys[:, :, :length].copy_(k)
            values[:, :, :length].copy_(v)
        state.prefix_bias.fill_(float("-inf"))
        state.prefix_bias[:length] = 0.0
        state.prefix_len = length

    def forget_batches_over(self, batch: int) -> None:
        """Free the buffers and graphs of batch buckets larger than ``batch`` (after running out of memory)."""
        for key in [k for k in self._states if k[0] > batch]:
            self._drop(key)

    # -- the transformer, over the static cache ----------------------------------------------------

    def _forward(
        self,
        state: _State,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        mask: torch.Tensor,
        kv_len: int,
        deepstack: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Hidden states of ``embeds`` (B, S, H) written at row ``slots`` (S,), attending per ``mask``.

        Every query sees the whole shared prefix. ``mask`` (B, S, kv_len) says which of the first
        ``kv_len`` row slots each query sees when S > 1; for one query (a decode step) it is ignored and
        the state's row mask over the first ``kv_len`` slots is used. ``positions`` is (B, S) for text or
        (3, B, S) for M-RoPE; ``deepstack`` is the visual token mask (B, S) and the vision tower's
        per-layer features, added after the first layers as Qwen3-VL does.
        """
        batch, seq, _ = embeds.shape
        position_ids = positions if positions.dim() == 3 else positions.unsqueeze(0).expand(3, batch, seq)
        cos, sin = self.lm.rotary_emb(embeds, position_ids)
        prefix_len = state.prefix_len
        if seq > 1:
            if prefix_len:
                seen = torch.ones(batch, seq, prefix_len, dtype=torch.bool, device=self.device)
                mask = torch.cat([seen, mask], dim=-1)
            sdpa_mask = mask.unsqueeze(1)  # (B, 1, S, prefix + kv_len)
        else:
            row_bias = torch.zeros(batch, kv_len, dtype=torch.float32, device=self.device)
            row_bias.masked_fill_(~state.mask[:, :kv_len], float("-inf"))
            capacity = state.prefix_bias.shape[0]
            bias = torch.cat([state.prefix_bias.expand(batch, capacity), row_bias], dim=-1)
            bias = bias.view(batch, 1, 1, capacity + kv_len)  # broadcast over kv heads and groups
        hidden = embeds
        for index, weights in enumerate(self._weights):
            q, k, v = self._attention_inputs(
                hidden, cos, sin, *weights[:6], self.eps, self.n_heads, self.n_kv, self.head_dim
            )
            keys, values = state.keys[index], state.values[index]
            keys.index_copy_(2, slots, k.to(keys.dtype))
            values.index_copy_(2, slots, v.to(values.dtype))
            q = q.to(keys.dtype)
            if seq > 1:
                # Many queries (prefill, forced block): one fused kernel over [prefix | row slots in use].
                row_keys, row_values = keys[:, :, :kv_len], values[:, :, :kv_len]
                if prefix_len:
                    shape = (batch, self.n_kv, prefix_len, self.head_dim)
                    row_keys = torch.cat(
                        [state.prefix_keys[index][:, :, :prefix_len].expand(shape), row_keys], 2
                    )
                    row_values = torch.cat(
                        [state.prefix_values[index][:, :, :prefix_len].expand(shape), row_values], 2
                    )
                out = torch.nn.functional.scaled_dot_product_attention(
                    q, row_keys, row_values, attn_mask=sdpa_mask, scale=self.scale, enable_gqa=True
                )
            else:
                out = self._grouped_attention(
                    q,
                    keys[:, :, :kv_len],
                    values[:, :, :kv_len],
                    state.prefix_keys[index][0],
                    state.prefix_values[index][0],
                    bias,
                    self.scale,
                )
            out = out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
            hidden = self._output_and_mlp(hidden, out, *weights[6:], self.eps)
            if deepstack is not None and index < len(deepstack[1]):
                visual_mask, features = deepstack
                hidden = hidden.clone()
                hidden[visual_mask] = hidden[visual_mask] + features[index].to(hidden.dtype)
        return self.lm.norm(hidden)

    def _step(self, state: _State, window: int) -> None:
        """One greedy decode step entirely on the device: reads and advances the state's tensors."""
        embeds = self.lm.embed_tokens(state.token).unsqueeze(1)
        slots = state.write_index.view(1)
        state.mask.index_fill_(1, slots, True)
        hidden = self._forward(state, embeds, state.position.unsqueeze(1), slots, state.mask, window)
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

    def _capture(self, state: _State, window: int) -> Any:
        snapshot = [
            t.clone() for t in (state.token, state.position, state.write_index, state.step, state.mask)
        ]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(CAPTURE_WARMUP_STEPS):
                self._step(state, window)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(state, window)
        self._pool = graph.pool()
        for target, saved in zip(
            (state.token, state.position, state.write_index, state.step, state.mask), snapshot, strict=True
        ):
            target.copy_(saved)
        return graph

    # -- public ------------------------------------------------------------------------------------

    def prefix_states(self, prefix_ids: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values (1, kv, P, D) per layer of a shared prompt prefix (positions 0..P-1), kept."""
        cached = self._prefixes.get(prefix_ids)
        if cached is not None:
            self._prefixes.move_to_end(prefix_ids)
            return cached
        length = len(prefix_ids)
        scratch = self._new_state(1, length, 1, 1)  # no prefix of its own: the prefix is its row
        ids = torch.tensor([prefix_ids], dtype=torch.long, device=self.device)
        positions = torch.arange(length, device=self.device).unsqueeze(0)
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=self.device)).unsqueeze(0)
        slots = torch.arange(length, device=self.device)
        self._forward(scratch, self.lm.embed_tokens(ids), positions, slots, causal, length)
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
        """Load the shared prefix and fill each row's slots with its suffix (image, caption); last hidden state per row.

        Row slots are [left padding][suffix]; ``positions`` (3, B, S) are the suffix's M-RoPE positions,
        continuing from the prefix's length.
        """
        real_batch, seq = suffix_ids.shape
        batch = bucket(real_batch, BATCH_BUCKETS) if self.use_cuda_graphs else real_batch
        length = round_up(seq + max_new_tokens + extra_slots + CAPTURE_WARMUP_STEPS, LENGTH_BUCKET)
        state = self._state(batch, length, max_new_tokens, len(prefix_ids))
        self._load_prefix(state, prefix_ids)
        state.mask.zero_()
        state.mask[:real_batch, :seq] = suffix_mask.bool()
        embeds = self.lm.embed_tokens(suffix_ids)
        embeds[visual_mask] = image_embeds.to(embeds.dtype)
        slots = torch.arange(seq, device=self.device)
        causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool, device=self.device))
        mask = state.mask[:real_batch, :seq].unsqueeze(1) & causal.unsqueeze(0)
        if not state.prefix_len:
            mask[:, :, 0] |= ~mask.any(dim=-1)  # padding queries still need one visible key
        rows = _rows(state, real_batch)
        hidden = self._forward(rows, embeds, positions, slots, mask, seq, (visual_mask, deepstack))
        state.write_index.fill_(seq)
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
        """Greedy-decode after ``prefill``; the tokens (B, steps + 1) and the first free row slot."""
        real_batch = first_token.shape[0]
        batch = state.token.shape[0]
        length = state.keys[0].shape[2]
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
        for ran in range(1, steps + 1):
            window = min(length, round_up(start + ran, WINDOW))  # this step writes slot start + ran - 1
            if self.use_cuda_graphs:
                graph = state.graphs.get(window)
                if graph is None:
                    graph = state.graphs[window] = self._capture(state, window)
                graph.replay()
            else:
                self._step(state, window)
            if ran >= min_new_tokens and ran % DONE_CHECK_EVERY == 0:
                produced = torch.cat([first_token.view(-1, 1), state.out_tokens[:real_batch, :ran]], dim=1)
                if bool((self.reply_end.first_stop(produced) < produced.shape[1]).all()):
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
        """Run a forced block (B, S) after each row's kept generated tokens; returns its hidden states.

        ``prompt_len`` is the suffix length (row slots before the first generated token).
        """
        real_batch, seq = block_ids.shape
        kv_len = start_slot + seq
        # Rows see their prompt, the generated tokens they keep, and the block causally.
        visible = state.mask[:real_batch, :kv_len].clone()
        generated = visible[:, prompt_len:start_slot]
        generated.copy_(generated_keep[:, : generated.shape[1]])
        slots = torch.arange(start_slot, kv_len, device=self.device)
        mask = visible.unsqueeze(1).expand(real_batch, seq, -1).clone()
        causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool, device=self.device))
        mask[:, :, start_slot:kv_len] = causal.unsqueeze(0) & block_mask.bool().unsqueeze(1)
        positions = start_positions.view(-1, 1) + torch.arange(seq, device=self.device).view(1, -1)
        embeds = self.lm.embed_tokens(block_ids)
        return self._forward(_rows(state, real_batch), embeds, positions, slots, mask, kv_len)


def _layer_weights(layer: Any, config: Any) -> tuple[Any, ...]:
    """A decoder layer's parameters in the order the layer functions take them.

    Plain linear layers give weight tensors, with q/k/v and gate/up each fused into one matrix (the
    projection is then one matrix product; k, v and up are None); quantized ones (bitsandbytes) stay
    modules and are called.
    """
    attn, mlp = layer.self_attn, layer.mlp
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "attention_bias", False):
        raise ValueError("the decoder supports Qwen3-VL text layers (SiLU MLP, no attention bias)")
    projections = (
        attn.q_proj,
        attn.k_proj,
        attn.v_proj,
        attn.o_proj,
        mlp.gate_proj,
        mlp.up_proj,
        mlp.down_proj,
    )
    if all(type(m) is torch.nn.Linear for m in projections):
        return (
            layer.input_layernorm.weight,
            _fused(attn, "_moderation_qkv", (attn.q_proj, attn.k_proj, attn.v_proj)),
            None,
            None,
            attn.q_norm.weight,
            attn.k_norm.weight,
            attn.o_proj.weight,
            layer.post_attention_layernorm.weight,
            _fused(mlp, "_moderation_gate_up", (mlp.gate_proj, mlp.up_proj)),
            None,
            mlp.down_proj.weight,
        )
    return (
        layer.input_layernorm.weight,
        attn.q_proj,
        attn.k_proj,
        attn.v_proj,
        attn.q_norm.weight,
        attn.k_norm.weight,
        attn.o_proj,
        layer.post_attention_layernorm.weight,
        mlp.gate_proj,
        mlp.up_proj,
        mlp.down_proj,
    )


def _fused(owner: Any, name: str, modules: tuple[Any, ...]) -> torch.Tensor:
    """One weight matrix for linear layers sharing an input; each layer's weight becomes a view of its rows.

    The model keeps working unchanged (its layers read their views) and no weight is stored twice.
    """
    fused = getattr(owner, name, None)
    if fused is None:
        with torch.no_grad():
            fused = torch.cat([m.weight for m in modules], dim=0)
            start = 0
            for m in modules:
                rows = m.weight.shape[0]
                m.weight = torch.nn.Parameter(fused[start : start + rows], requires_grad=False)
                start += rows
        setattr(owner, name, fused)
    return fused


def _compiled(fn: Any, *, dynamic: bool = True) -> Any:
    config = torch._dynamo.config
    # A machine that cannot compile (no C compiler for Triton's launcher, say) runs these functions
    # eagerly, with a warning in the log, instead of failing the worker.
    config.suppress_errors = True
    # One decoder compiles a few dozen shapes of its attention (batch buckets x windows); allow them all.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(int(getattr(config, name)), RECOMPILE_LIMIT))
    return torch.compile(fn, dynamic=dynamic)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's RMSNorm: normalised in float32, scaled in the input's dtype."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _linear(x: torch.Tensor, weight: Any) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight) if isinstance(weight, torch.Tensor) else weight(x)


def _attention_inputs(
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm: torch.Tensor,
    q_proj: Any,
    k_proj: Any,
    v_proj: Any,
    q_norm: torch.Tensor,
    k_norm: torch.Tensor,
    eps: float,
    n_heads: int,
    n_kv: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values (B, heads, S, D) of a layer: input norm, projections, q/k norms, rotary."""
    batch, seq, _ = hidden.shape
    x = _rms_norm(hidden, norm, eps)
    if k_proj is None:  # q, k and v fused into one matrix
        q_out, k_out, v_out = _linear(x, q_proj).split(
            [n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], -1
        )
    else:
        q_out, k_out, v_out = _linear(x, q_proj), _linear(x, k_proj), _linear(x, v_proj)
    q = _rms_norm(q_out.reshape(batch, seq, n_heads, head_dim), q_norm, eps).transpose(1, 2)
    k = _rms_norm(k_out.reshape(batch, seq, n_kv, head_dim), k_norm, eps).transpose(1, 2)
    v = v_out.reshape(batch, seq, n_kv, head_dim).transpose(1, 2)
    q, k = _rotate(q, k, cos, sin)
    return q, k, v


def _output_and_mlp(
    hidden: torch.Tensor,
    attention: torch.Tensor,
    o_proj: Any,
    norm: torch.Tensor,
    gate_proj: Any,
    up_proj: Any,
    down_proj: Any,
    eps: float,
) -> torch.Tensor:
    """The rest of a layer: output projection and residual, post-attention norm, SiLU MLP and residual."""
    hidden = hidden + _linear(attention, o_proj)
    x = _rms_norm(hidden, norm, eps)
    if up_proj is None:  # gate and up fused into one matrix
        gate, up = _linear(x, gate_proj).chunk(2, dim=-1)
    else:
        gate, up = _linear(x, gate_proj), _linear(x, up_proj)
    return hidden + _linear(torch.nn.functional.silu(gate) * up, down_proj)


def _grouped_attention(
    q: torch.Tensor,
    row_keys: torch.Tensor,
    row_values: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per row (B, heads, 1, D) over [shared prefix (kv, P, D) | its row slots (B, kv, W, D)].

    Queries are grouped per key/value head, so no key is ever repeated: the prefix's scores for all rows
    are one (kv, B*groups, D) @ (kv, D, P) product against its single copy. ``bias`` (B, 1, 1, P + W) is 0
    where a row may attend and -inf elsewhere.
    """
    batch, n_heads, _, head_dim = q.shape
    n_kv, capacity = prefix_keys.shape[0], prefix_keys.shape[1]
    window = row_keys.shape[2]
    groups = n_heads // n_kv
    qg = q.reshape(batch, n_kv, groups, head_dim)
    q_by_head = qg.transpose(0, 1).reshape(n_kv, batch * groups, head_dim)
    prefix_scores = torch.matmul(q_by_head, prefix_keys.transpose(1, 2))  # (kv, B*g, P)
    prefix_scores = prefix_scores.view(n_kv, batch, groups, capacity).transpose(0, 1)
    row_scores = torch.matmul(qg, row_keys.transpose(2, 3))  # (B, kv, g, W)
    scores = torch.cat([prefix_scores, row_scores], dim=-1).float() * scale + bias
    probs = torch.softmax(scores, dim=-1).to(row_values.dtype)
    prefix_probs, row_probs = probs.split([capacity, window], dim=-1)
    out = torch.matmul(row_probs, row_values)  # (B, kv, g, D)
    prefix_probs = prefix_probs.transpose(0, 1).reshape(n_kv, batch * groups, capacity)
    prefix_out = torch.matmul(prefix_probs, prefix_values).view(n_kv, batch, groups, head_dim)
    return (out + prefix_out.transpose(0, 1)).reshape(batch, n_heads, 1, head_dim)


def _rows(state: _State, real_batch: int) -> _State:
    """A view of the first ``real_batch`` rows of a state's cache (bucket padding rows left out)."""
    return _State(
        keys=[k[:real_batch] for k in state.keys],
        values=[v[:real_batch] for v in state.values],
        prefix_keys=state.prefix_keys,
        prefix_values=state.prefix_values,
        prefix_bias=state.prefix_bias,
        mask=state.mask[:real_batch],
        token=state.token,
        position=state.position,
        write_index=state.write_index,
        out_tokens=state.out_tokens,
        step=state.step,
        prefix_len=state.prefix_len,
    )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotary embedding's half swap: (x1, x2) -> (-x2, x1) over the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
