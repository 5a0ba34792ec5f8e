"""The engine's own prefill (shared prefix + image suffix) and static-cache decoder match transformers."""

from __future__ import annotations

from typing import Any

import torch

from moderation.engine import prompts
from moderation.engine.decoder import (
    BATCH_BUCKETS,
    CAPTURE_WARMUP_STEPS,
    WINDOW,
    StaticDecoder,
    bucket,
    round_up,
)
from moderation.engine.images import prepare_image
from moderation.engine.transformers_engine import _USER_HEADER

from .test_transformers_engine import _image

CAPTIONS = ["A cat.", "A much longer caption about a busy street market at dusk, with fruit stalls."]
SIZES = [(64, 96), (160, 128)]


def _texts(engine: Any) -> tuple[list[Any], list[str]]:
    images = [prepare_image(_image(size, i), 512 * 512, 1024) for i, size in enumerate(SIZES)]
    systems = [prompts.judge_system(prompts.DEFAULT_CATEGORIES, "en")] * len(CAPTIONS)
    users = [prompts.judge_user(c, "en") for c in CAPTIONS]
    return images, engine._chat_texts(images, systems, users)


def _processor_inputs(engine: Any, texts: list[str], images: list[Any]) -> Any:
    """The reference model inputs: transformers' own processor, no resizing."""
    return engine._processor(text=texts, images=images, padding=True, return_tensors="pt", do_resize=False)


def _prefill(
    engine: Any, decoder: Any, images: list[Any], texts: list[str], steps: int, extra_slots: int
) -> tuple[Any, torch.Tensor, torch.Tensor, int]:
    """Prefill through ``decoder`` as the engine does: its state, last hidden states, next positions, suffix length."""
    cut = texts[0].index(_USER_HEADER) + len(_USER_HEADER)
    prefix = tuple(int(i) for i in engine._tokenizer(texts[0][:cut], add_special_tokens=False)["input_ids"])
    batch = engine._encode([t[cut:] for t in texts], images)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions, following = engine._suffix_positions(ids, mask, batch["image_grid_thw"], len(prefix))
    embeds, deepstack = engine._vision(batch["pixel_values"], batch["image_grid_thw"])
    state, last = decoder.prefill(
        prefix,
        ids,
        mask,
        positions,
        ids == engine._image_token_id,
        embeds,
        deepstack,
        max_new_tokens=steps,
        extra_slots=extra_slots,
    )
    return state, last, following, ids.shape[1]


def _ours(engine: Any, images: list[Any], texts: list[str], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First-token logits and greedy tokens from the engine's prefill + decoder."""
    state, last, following, _ = _prefill(engine, engine._decoder, images, texts, steps, 0)
    logits = engine._model.lm_head(last).float()
    masked = logits.clone()
    masked[:, engine._suppress_ids] = float("-inf")
    tokens, _ = engine._decoder.decode(
        state, masked.argmax(dim=-1), following, max_new_tokens=steps, min_new_tokens=0
    )
    return logits, tokens


def test_prefill_logits_and_greedy_tokens_match_transformers(engine: Any) -> None:
    images, texts = _texts(engine)
    steps = 12
    with torch.inference_mode():
        full = _processor_inputs(engine, texts, images)
        reference_logits = engine._model(**full).logits[:, -1].float()
        reference = engine._model.generate(
            **full,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            suppress_tokens=engine._suppress_ids,
            pad_token_id=engine._pad_id,
        )[:, full["input_ids"].shape[1] :]
        logits, tokens = _ours(engine, images, texts, steps)
    assert torch.allclose(logits, reference_logits, atol=1e-4, rtol=1e-4)
    eos = set(engine._eos_ids)
    for ours_row, ref_row in zip(tokens.tolist(), reference.tolist(), strict=True):
        stop = next((i for i, t in enumerate(ref_row) if t in eos), len(ref_row))
        assert ours_row[: stop + 1] == ref_row[: stop + 1]


def test_buckets() -> None:
    assert [bucket(n, BATCH_BUCKETS) for n in (1, 3, 8, 9, 100, 300)] == [1, 4, 8, 16, 128, 300]
    assert round_up(257, 256) == 512 and round_up(256, 256) == 256


def test_forced_block_after_long_decode_matches_a_full_forward_pass(engine: Any) -> None:
    """Decode past several attention windows, force a block, and compare its logits with one plain forward."""
    images, texts = _texts(engine)
    steps = 2 * WINDOW + 5
    decoder = StaticDecoder(
        engine._model,
        use_cuda_graphs=False,
        suppress_ids=engine._suppress_ids,
        eos_ids=engine._eos_ids,
        min_new_tokens=steps,  # no end-of-sequence: every row keeps all its tokens
    )
    block = torch.tensor([engine._tokenizer.encode("conflict: no\nsexual: no", add_special_tokens=False)] * 2)
    with torch.inference_mode():
        state, last, following, suffix_len = _prefill(
            engine, decoder, images, texts, steps, block.shape[1] + 1
        )
        first = engine._model.lm_head(last).float()
        first[:, engine._suppress_ids] = float("-inf")
        first[:, engine._eos_ids] = float("-inf")
        tokens, next_slot = decoder.decode(
            state, first.argmax(dim=-1), following, max_new_tokens=steps, min_new_tokens=steps
        )
        assert tokens.shape[1] == steps and next_slot == suffix_len + steps - 1
        forced = torch.cat([tokens[:, -1:], block], dim=1)
        hidden = decoder.teacher_force(
            state,
            forced,
            torch.ones_like(forced, dtype=torch.bool),
            torch.ones(2, steps - 1, dtype=torch.bool),
            start_slot=next_slot,
            start_positions=following + steps - 1,
            prompt_len=suffix_len,
        )
        ours = engine._model.lm_head(hidden).float()
        full = _processor_inputs(engine, texts, images)
        extra = torch.cat([tokens[:, :-1], forced], dim=1)
        reference = (
            engine._model(
                input_ids=torch.cat([full["input_ids"], extra], dim=1),
                attention_mask=torch.cat([full["attention_mask"], torch.ones_like(extra)], dim=1),
                pixel_values=full["pixel_values"],
                image_grid_thw=full["image_grid_thw"],
                mm_token_type_ids=torch.cat([full["mm_token_type_ids"], torch.zeros_like(extra)], dim=1),
            )
            .logits[:, -forced.shape[1] :]
            .float()
        )
    assert torch.allclose(ours, reference, atol=1e-4, rtol=1e-4)


def test_fused_projections_share_the_model_weights(engine: Any) -> None:
    """q/k/v and gate/up run as one matrix each, and the model's own layers read views of it (no copy)."""
    layer = engine._model.model.language_model.layers[0]
    qkv, gate_up = layer.self_attn._moderation_qkv, layer.mlp._moderation_gate_up
    assert qkv.shape[0] == sum(
        m.weight.shape[0] for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
    )
    assert layer.self_attn.q_proj.weight.data_ptr() == qkv.data_ptr()
    assert layer.self_attn.v_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    assert layer.mlp.up_proj.weight.untyped_storage().data_ptr() == gate_up.untyped_storage().data_ptr()
    assert torch.equal(gate_up[layer.mlp.gate_proj.weight.shape[0] :], layer.mlp.up_proj.weight)


def test_a_graph_captured_on_the_last_step_has_room_for_its_warm_up_steps(engine: Any) -> None:
    """Capturing mid-decode runs real warm-up steps past the current one: they must stay inside the buffers."""
    images, texts = _texts(engine)
    steps = 8
    decoder = StaticDecoder(
        engine._model, use_cuda_graphs=False, suppress_ids=engine._suppress_ids, eos_ids=engine._eos_ids
    )
    with torch.inference_mode():
        state, _, _, suffix_len = _prefill(engine, decoder, images, texts, steps, 0)
        state.step.fill_(steps - 1)  # the last decode step, as when its attention window is new
        state.write_index.fill_(suffix_len + steps - 1)
        for _ in range(CAPTURE_WARMUP_STEPS + 1):  # the warm-up steps, then the captured one
            decoder._step(state, state.keys[0].shape[2])


def test_buffers_of_past_batch_shapes_are_kept_within_a_byte_budget_least_recently_used_first(
    engine: Any,
) -> None:
    """Shapes vary with images and captions: each new one must not keep GPU memory forever."""
    decoder = StaticDecoder(
        engine._model, use_cuda_graphs=False, suppress_ids=engine._suppress_ids, eos_ids=engine._eos_ids
    )
    assert decoder.state_budget_bytes == 0  # without graphs only the buffers in use are kept
    one = decoder._state(1, 256, 8, 10)
    decoder.state_budget_bytes = 3 * one.nbytes  # as a GPU engine sets it
    assert decoder._state_bytes(1, 256, 8, 10) <= one.nbytes <= decoder._state_bytes(1, 256, 8, 10) * 1.05
    decoder._state(2, 256, 8, 10)  # two units
    assert list(decoder._states) == [(1, 256, 8), (2, 256, 8)]
    assert decoder._state(1, 256, 8, 10) is one  # kept, and now the most recently used
    decoder._state(1, 512, 8, 10)  # two units: the least recently used (2, 256) goes
    assert list(decoder._states) == [(1, 256, 8), (1, 512, 8)]
    assert decoder.held_state_bytes <= decoder.state_budget_bytes
    decoder._state(4, 512, 8, 10)  # larger than the budget on its own: kept alone while in use
    assert list(decoder._states) == [(4, 512, 8)]


def test_a_gpu_engine_keeps_a_share_of_the_free_memory_for_past_shapes() -> None:
    from moderation.engine.transformers_engine import decode_cache_budget

    assert decode_cache_budget(2.5, torch.device("cpu")) == int(2.5 * 2**30)
    assert decode_cache_budget(0, torch.device("cpu")) == 0


def test_the_graph_pool_is_started_afresh_once_its_last_graph_is_freed(engine: Any) -> None:
    """PyTorch refuses to capture into a pool whose graphs are all gone (seen on an H200): start a new one."""
    decoder = StaticDecoder(
        engine._model, use_cuda_graphs=False, suppress_ids=engine._suppress_ids, eos_ids=engine._eos_ids
    )
    decoder.state_budget_bytes = 1 << 40
    first, second = decoder._state(1, 256, 8, 10), decoder._state(2, 256, 8, 10)
    pool = decoder._pool = object()  # what graph.pool() hands back after a capture
    first.graphs[64] = second.graphs[64] = object()
    decoder.forget_batches_over(1)  # a graph of the first bucket still holds the pool
    assert decoder._pool is pool
    decoder.forget_all()
    assert decoder._pool is None and decoder.held_state_bytes == 0
