"""The engine's own image inputs equal what Qwen3VLProcessor makes (ids, mask, pixel patches, grids)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from moderation.engine.images import prepare_image
from moderation.engine.vision_inputs import PatchSpec, pixel_patches

from .test_transformers_engine import _image

SIZES = [(64, 96), (160, 128), (64, 96), (512, 512)]


def test_inputs_match_the_processor(engine: Any) -> None:
    images = [prepare_image(_image(size, i), 512 * 512, 1024) for i, size in enumerate(SIZES)]
    texts = [
        f"<|vision_start|><|image_pad|><|vision_end|>caption {i} {'long ' * i}<|im_end|>"
        for i in range(len(images))
    ]
    ours = engine._encode(texts, images)
    reference = engine._processor(
        text=texts, images=images, padding=True, return_tensors="pt", do_resize=False
    )
    assert torch.equal(ours["input_ids"], reference["input_ids"])
    assert torch.equal(ours["attention_mask"], reference["attention_mask"])
    assert torch.equal(ours["image_grid_thw"], reference["image_grid_thw"])
    assert ours["pixel_values"].shape == reference["pixel_values"].shape
    assert torch.allclose(ours["pixel_values"], reference["pixel_values"].float(), atol=1e-6, rtol=0)


def test_patch_spec_counts_visual_tokens(engine: Any) -> None:
    spec = PatchSpec.of(engine._processor.image_processor)
    assert (spec.patch_size, spec.merge_size, spec.temporal_patch_size) == (16, 2, 2)
    assert spec.tokens(512, 512) == 256 and spec.tokens(64, 96) == 6


def test_rejects_images_not_prepared(engine: Any) -> None:
    spec = PatchSpec.of(engine._processor.image_processor)
    with pytest.raises(ValueError, match="multiple of 32"):
        pixel_patches([Image.new("RGB", (50, 64))], spec, torch.device("cpu"))
    with pytest.raises(ValueError, match="RGB"):
        pixel_patches([Image.new("L", (64, 64))], spec, torch.device("cpu"))


def test_one_placeholder_per_prompt(engine: Any) -> None:
    image = prepare_image(_image((64, 64), 0), 512 * 512, 1024)
    with pytest.raises(ValueError, match="exactly one image placeholder"):
        engine._encode(["no placeholder"], [image])
