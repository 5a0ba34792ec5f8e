"""The tiny Qwen3-VL fixture: folder layout, offline loading, determinism and visual-token counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

from moderation.engine.fixture import (
    CHAT_TEMPLATE_PATH,
    FIXTURE_MARKER,
    QWEN3_VL_8B_DIR,
    build_fixture_model,
    is_fixture_folder,
    qwen_tokenizer_dir,
)
from moderation.engine.images import prepare_image

IMAGE_PAD = "<|image_pad|>"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_folder_layout_and_marker(fixture_model_dir: Path) -> None:
    names = {p.name for p in fixture_model_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        FIXTURE_MARKER,
    } <= names
    marker = json.loads((fixture_model_dir / FIXTURE_MARKER).read_text())
    assert marker["fixture"] is True and marker["seed"] == 0
    assert is_fixture_folder(fixture_model_dir)
    assert not is_fixture_folder(QWEN3_VL_8B_DIR)


def test_config_copies_real_token_ids(fixture_model_dir: Path) -> None:
    real = json.loads((QWEN3_VL_8B_DIR / "config.json").read_text())
    tiny = json.loads((fixture_model_dir / "config.json").read_text())
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert tiny[key] == real[key]
    assert tiny["text_config"]["vocab_size"] == real["text_config"]["vocab_size"] == 151936
    rope = tiny["text_config"]["rope_parameters"]
    assert rope["mrope_interleaved"] is True
    assert sum(rope["mrope_section"]) == tiny["text_config"]["head_dim"] // 2
    vision = tiny["vision_config"]
    assert (
        vision["patch_size"] == 16
        and vision["spatial_merge_size"] == 2
        and vision["temporal_patch_size"] == 2
    )
    assert vision["out_hidden_size"] == tiny["text_config"]["hidden_size"]
    assert all(0 <= i < vision["depth"] for i in vision["deepstack_visual_indexes"])


def test_loads_offline_through_from_pretrained(fixture_model_dir: Path) -> None:
    model = Qwen3VLForConditionalGeneration.from_pretrained(fixture_model_dir, local_files_only=True)
    processor = AutoProcessor.from_pretrained(fixture_model_dir, local_files_only=True)
    assert isinstance(processor, Qwen3VLProcessor)
    assert processor.video_processor is not None
    assert str(processor.chat_template).strip() == CHAT_TEMPLATE_PATH.read_text(encoding="utf-8").strip()
    assert processor.image_processor.patch_size == 16 and processor.image_processor.merge_size == 2
    assert model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) < 15_000_000


def test_real_qwen_tokenizer_is_used(fixture_model_dir: Path) -> None:
    processor = Qwen3VLProcessor.from_pretrained(fixture_model_dir, local_files_only=True)
    tok = processor.tokenizer
    assert (qwen_tokenizer_dir() / "tokenizer.json").is_file()
    assert tok.convert_tokens_to_ids(IMAGE_PAD) == 151655
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    for word in (" yes", " no", "yes", "no"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1


def test_chat_template_renders_qwen_format(fixture_model_dir: Path) -> None:
    processor = Qwen3VLProcessor.from_pretrained(fixture_model_dir, local_files_only=True)
    conversation: list[dict[str, Any]] = [
        {"role": "system", "content": [{"type": "text", "text": "SYS"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
    ]
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nSYS<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_same_seed_gives_identical_weights(fixture_model_dir: Path, tmp_path: Path) -> None:
    again = build_fixture_model(tmp_path / "again", seed=0)
    other = build_fixture_model(tmp_path / "other", seed=1)
    first, second, third = _weights(fixture_model_dir), _weights(again), _weights(other)
    assert first.keys() == second.keys() == third.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], third[k]) for k in first)
    assert json.loads((other / FIXTURE_MARKER).read_text())["seed"] == 1


@pytest.mark.parametrize(("size", "tokens"), [((512, 512), 256), ((1024, 1024), 256), ((448, 448), 196)])
def test_visual_token_count(fixture_model_dir: Path, size: tuple[int, int], tokens: int) -> None:
    processor = Qwen3VLProcessor.from_pretrained(fixture_model_dir, local_files_only=True)
    image = prepare_image(Image.new("RGB", size, (30, 60, 90)), 512 * 512, 32 * 32)
    conversation: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}
    ]
    text = processor.apply_chat_template(
        conversation,
        tokenize=False,
        add_generation_prompt=True,
    )
    batch = processor(text=[text], images=[image], return_tensors="pt", do_resize=False)
    image_pad_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    assert int((batch["input_ids"] == image_pad_id).sum()) == tokens
    assert batch["image_grid_thw"].tolist() == [[1, image.height // 16, image.width // 16]]
