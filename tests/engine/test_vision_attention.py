"""The batched vision attention gives what transformers' per-image attention gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moderation.engine.images import prepare_image
from moderation.engine.vision_attention import batch_vision_attention

from .test_transformers_engine import _image

# Runs of equal sizes (batched) between sizes seen once (a run of one).
SIZES = [(64, 96), (64, 96), (64, 96), (160, 128), (64, 64), (64, 64)]


def _outputs(model: Any, engine: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    images = [prepare_image(_image(size, i), 512 * 512, 1024) for i, size in enumerate(SIZES)]
    batch = engine._processor.image_processor(images=images, do_resize=False, return_tensors="pt")
    with torch.inference_mode():
        output = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    if isinstance(output, tuple):
        return output[0], list(output[1])
    return output.pooler_output, list(output.deepstack_features)


def test_batched_attention_matches_per_image_attention(engine: Any, fixture_model_dir: Path) -> None:
    from transformers import Qwen3VLForConditionalGeneration

    reference_model = Qwen3VLForConditionalGeneration.from_pretrained(
        fixture_model_dir, local_files_only=True, attn_implementation="sdpa"
    ).eval()
    assert not getattr(reference_model.model.visual.blocks[0].attn, "_moderation_batched_attention", False)
    assert getattr(engine._model.model.visual.blocks[0].attn, "_moderation_batched_attention", False)
    ours, ours_deep = _outputs(engine._model, engine)
    reference, reference_deep = _outputs(reference_model, engine)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-4)
    assert len(ours_deep) == len(reference_deep) > 0
    for a, b in zip(ours_deep, reference_deep, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_patching_twice_is_harmless(engine: Any) -> None:
    visual = engine._model.model.visual
    forward = visual.blocks[0].attn.forward
    assert batch_vision_attention(visual)
    assert visual.blocks[0].attn.forward is forward


def test_unknown_towers_are_left_alone() -> None:
    assert not batch_vision_attention(torch.nn.Linear(2, 2))
