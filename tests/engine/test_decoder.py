"""The static-cache decoder produces exactly what transformers' own generate produces."""

from __future__ import annotations

from typing import Any

import torch

from moderation.engine import prompts
from moderation.engine.decoder import BATCH_BUCKETS, bucket, round_up
from moderation.engine.images import prepare_image

from .test_transformers_engine import _image


def _inputs(engine: Any, captions: list[str], sizes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    images = [prepare_image(_image(size, i), 512 * 512, 1024) for i, size in enumerate(sizes)]
    questions = [prompts.judge_question(c, prompts.DEFAULT_CATEGORIES, "en") for c in captions]
    return engine._encode(engine._chat_texts(images, questions, ["en"] * len(captions)), images)


def test_greedy_tokens_match_transformers_generate(engine: Any) -> None:
    batch = _inputs(
        engine,
        ["A cat.", "A much longer caption about a busy street market at dusk."],
        [(64, 96), (160, 128)],
    )
    steps = 12
    with torch.inference_mode():
        reference = engine._model.generate(
            **batch,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            suppress_tokens=engine._suppress_ids,
            pad_token_id=engine._pad_id,
        )[:, batch["input_ids"].shape[1] :]
        outputs = engine._model(**batch, use_cache=True)
        logits = outputs.logits[:, -1].float()
        logits[:, engine._suppress_ids] = float("-inf")
        first = logits.argmax(dim=-1)
        cache = getattr(outputs, "cache", None) or getattr(outputs, "past_key_values", None)
        decoder = engine._decoder
        saved = decoder._eos_allowed_from_step.clone()
        decoder._eos_allowed_from_step.fill_(steps)  # as min_new_tokens=steps
        try:
            _, tokens, next_slot = decoder.generate(
                cache,
                batch["attention_mask"],
                first,
                engine._model.model.rope_deltas,
                max_new_tokens=steps,
                min_new_tokens=steps,
                extra_slots=0,
            )
        finally:
            decoder._eos_allowed_from_step.copy_(saved)
    assert tokens.tolist() == reference.tolist()
    assert next_slot == batch["input_ids"].shape[1] + steps - 1


def test_buckets() -> None:
    assert [bucket(n, BATCH_BUCKETS) for n in (1, 3, 8, 9, 100, 300)] == [1, 4, 8, 16, 128, 300]
    assert round_up(257, 256) == 512 and round_up(256, 256) == 256
