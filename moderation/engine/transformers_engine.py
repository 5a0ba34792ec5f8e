"""Moderation engine on Hugging Face transformers and Qwen3-VL.

A batch is judged in two passes over the whole batch (left-padded, so every row ends at the same column):

1. **Scoring** — one forward pass, no generation. Each request becomes a chat with the image, the quoted
   caption and yes/no questions ("conflict", then one per category); the assistant turn is teacher-forced
   as ``conflict: no`` / ``<category>: no`` lines. At the position that predicts each answer word the
   engine reads the next-token distribution and sums the probabilities of every single-token spelling
   of yes (with and without a leading space, any case: ``" yes"``, ``"yes"``, ``" Yes"``, ...) and of
   no. The score is ``P(yes) / (P(yes) + P(no))``; scores are never parsed from generated text. Later
   answers are conditioned on the earlier teacher-forced "no" lines, the same prefix for every
   submission, so scores stay comparable across submissions.
2. **Describe** — one batched greedy ``generate`` producing a labelled description, the visible text and
   a short explanation, parsed leniently (the fixture model writes random tokens; parsing never fails).

**Confidence** of a verdict::

    mass       = P(yes) + P(no) at the conflict answer position (all spellings, full-vocabulary softmax)
    confidence = mass * (1 - H(conflict_score) / ln 2)

where ``H(p) = -p ln p - (1 - p) ln(1 - p)`` is the binary entropy in nats. It lies in [0, 1]: it is high
only when the model both answers in the expected yes/no form (mass near 1) and is decisive (score near 0
or 1), and falls to 0 for a coin-flip score or for a model that does not answer yes/no at all.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from moderation.engine import prompts
from moderation.engine.base import (
    BatchPartlyFailed,
    EngineHealth,
    EngineRequest,
    EngineResult,
    ModelInfo,
    ModerationEngine,
)
from moderation.engine.decoder import ReplyEnd, StaticDecoder
from moderation.engine.fixture import CHAT_TEMPLATE_PATH, FIXTURE_MARKER, is_fixture_folder
from moderation.engine.images import VISUAL_TOKEN_FACTOR, prepare_image, synthetic_image
from moderation.engine.scoring import (
    NO_VARIANTS,
    YES_VARIANTS,
    binary_entropy,
    confidence_from,
    eos_token_ids,
    parse_description,
    reply_end_tokens,
    request_language,
    suppressed_token_ids,
)
from moderation.engine.vision_attention import batch_vision_attention
from moderation.engine.vision_inputs import PatchSpec, pixel_patches

if TYPE_CHECKING:
    from moderation.config import Settings

logger = logging.getLogger(__name__)

FIXTURE_WARNING = "FIXTURE MODEL IN USE — verdicts are random, not for production"

#: Threads preparing a batch's images (decode, orientation, resize) before inference.
IMAGE_THREADS = max(1, min(8, os.cpu_count() or 1))

_USER_HEADER = "<|im_start|>user\n"
_IMAGE_PAD = "<|image_pad|>"


class EngineConfigError(ValueError):
    """The engine settings cannot work on this machine (e.g. 8-bit quantization on a CPU)."""


@dataclass(frozen=True)
class _Scored:
    conflict_score: float
    conflict_mass: float
    category_scores: dict[str, float]


#: Share of the device memory free after loading that decode buffers of past batch shapes may keep.
DECODE_CACHE_SHARE = 0.35


def decode_cache_budget(gib: float, device: torch.device) -> int:
    """Bytes of decode buffers (and their graphs) kept across batch shapes: ``gib``, or a share of what is free."""
    if gib > 0:
        return int(gib * 2**30)
    if device.type != "cuda":
        return 0
    free, _total = torch.cuda.mem_get_info(device)
    return int(free * DECODE_CACHE_SHARE)


def _resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineConfigError(f"device={setting!r} requested but CUDA is not available")
    return device


def _resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[setting]


def _quantization_config(setting: str, device: torch.device, dtype: torch.dtype) -> Any:
    if setting == "none":
        return None
    if device.type != "cuda":
        raise EngineConfigError(
            f"quantization={setting!r} needs a CUDA GPU (bitsandbytes); this engine runs on {device}. "
            "Set MODERATION_QUANTIZATION=none to run unquantized."
        )
    from transformers import BitsAndBytesConfig

    # The vision tower is small and quality-sensitive and the LM head feeds the scores: keep both unquantized.
    skip = ["visual", "lm_head"]
    if setting == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if setting == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip,
        )
    raise EngineConfigError(f"unknown quantization {setting!r}")


class TransformersEngine(ModerationEngine):
    """Qwen3-VL moderation engine: teacher-forced yes/no scoring plus a generated description."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        info: ModelInfo,
        device: torch.device,
        max_new_tokens: int,
        image_max_pixels: int,
        image_min_pixels: int,
        warmup_batch_size: int = 4,
        min_new_tokens: int = 0,
        use_cuda_graphs: bool = True,
        compile_decode: bool = False,
        max_caption_tokens: int = 2048,
        decode_cache_gib: float = 0.0,
    ) -> None:
        self._model = model
        self._processor = processor
        self._tokenizer = processor.tokenizer
        self._tokenizer.padding_side = "left"
        self._info = info
        self._device = device
        self._max_new_tokens = max_new_tokens
        # Benchmarks force a fixed generation length (random weights stop anywhere); production leaves it 0.
        self._min_new_tokens = min(min_new_tokens, max_new_tokens)
        self._max_pixels = image_max_pixels
        self._min_pixels = image_min_pixels
        self._max_caption_tokens = max_caption_tokens
        self._warmup_batch_size = max(1, warmup_batch_size)
        self._lock = threading.Lock()
        #: Largest batch known to fit on the device (None until one has run out of memory).
        self._fitting_batch: int | None = None
        #: Largest batch judged without running out of memory.
        self._largest_fitted = 0
        # Pillow releases the GIL while decoding and resizing: a batch's images are prepared in parallel.
        self._image_pool = ThreadPoolExecutor(max_workers=IMAGE_THREADS, thread_name_prefix="engine-images")
        image_processor = processor.image_processor
        self._factor = (
            int(image_processor.patch_size) * int(image_processor.merge_size) or VISUAL_TOKEN_FACTOR
        )
        self._yes_ids = self._single_token_ids(YES_VARIANTS)
        self._no_ids = self._single_token_ids(NO_VARIANTS)
        if not self._yes_ids or not self._no_ids:
            raise RuntimeError("the tokenizer has no single-token spelling of yes/no; cannot score")
        self._eos_ids = eos_token_ids(self._tokenizer, self._model.generation_config)
        self._pad_id = self._tokenizer.pad_token_id
        if self._pad_id is None:
            self._pad_id = self._eos_ids[0]
        self._suppress_ids = suppressed_token_ids(self._tokenizer)
        self._blocks: dict[tuple[str, ...], tuple[list[int], list[int]]] = {}
        self._image_token_id = int(self._tokenizer.convert_tokens_to_ids(_IMAGE_PAD))
        self._patch_spec = PatchSpec.of(image_processor)
        self._merge = int(image_processor.merge_size)
        #: When True, ``timings`` holds the seconds each stage of the last batch took (synchronising the device).
        self.profile = False
        self.timings: dict[str, float] = {}
        compile_layers = compile_decode and use_cuda_graphs and device.type == "cuda"
        if not batch_vision_attention(model.model.visual, compile_rotary=compile_layers):
            logger.warning("vision tower layout not recognised: its attention runs once per image")
        self._decoder = StaticDecoder(
            model,
            use_cuda_graphs=use_cuda_graphs,
            suppress_ids=self._suppress_ids,
            eos_ids=self._eos_ids,
            min_new_tokens=self._min_new_tokens,
            compile_step=compile_layers,
            state_budget_bytes=decode_cache_budget(decode_cache_gib, device),
            reply_end=ReplyEnd(
                self._eos_ids,
                reply_end_tokens(self._tokenizer),
                device=device,
                min_tokens=self._min_new_tokens,
            ),
        )
        if self._decoder.use_cuda_graphs:
            logger.info(
                "decode buffers and graphs are kept for up to %.1f GiB of batch shapes",
                self._decoder.state_budget_bytes / 2**30,
            )

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def load(cls, settings: Settings) -> TransformersEngine:
        """Load the model and processor named by ``settings.model`` once, ready for inference."""
        from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

        device = _resolve_device(settings.device)
        dtype = _resolve_dtype(settings.dtype, device)
        quantization = _quantization_config(settings.quantization, device, dtype)
        source = settings.model
        local = Path(source).expanduser().is_dir()
        fixture = local and is_fixture_folder(Path(source).expanduser())
        if local:
            source = str(Path(source).expanduser().resolve())
        if fixture:
            logger.warning("%s (model folder: %s)", FIXTURE_WARNING, source)

        common: dict[str, Any] = {"revision": settings.model_revision} if settings.model_revision else {}
        if local:
            common["local_files_only"] = True
        model_kwargs: dict[str, Any] = {
            **common,
            "dtype": dtype,
            "attn_implementation": settings.attn_implementation or "sdpa",
        }
        if quantization is not None:
            model_kwargs["quantization_config"] = quantization
        if device.type == "cuda":
            model_kwargs["device_map"] = {"": str(device)}
        started = time.perf_counter()
        model: Any = Qwen3VLForConditionalGeneration.from_pretrained(source, **model_kwargs)
        if device.type != "cuda":
            model = model.to(device)
        model.eval()
        processor = Qwen3VLProcessor.from_pretrained(source, **common)
        if not getattr(processor, "chat_template", None):
            processor.chat_template = CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
        logger.info(
            "Loaded %s on %s (%s, quantization=%s) in %.1fs",
            source,
            device,
            dtype,
            settings.quantization,
            time.perf_counter() - started,
        )

        answers_depend_on = (
            f"dtype={dtype};quantization={settings.quantization};pixels={settings.image_min_pixels}-"
            f"{settings.image_max_pixels};max_new_tokens={settings.max_new_tokens};"
            f"caption_tokens={settings.max_caption_tokens}"
        )
        if fixture:
            info = ModelInfo(
                name=f"fixture:{Path(source).name}",
                revision=_fixture_revision(Path(source)),
                prompt_version=prompts.PROMPT_VERSION,
                is_fixture=True,
                settings=answers_depend_on,
            )
        else:
            commit = getattr(model.config, "_commit_hash", None)
            # A local folder has no commit: its files identify it, so weights replaced in place are a new
            # revision (and the verdict cache does not hand out the old model's verdicts).
            fallback = _folder_revision(Path(source)) if local else "unknown"
            info = ModelInfo(
                name=settings.model,
                revision=settings.model_revision or commit or fallback,
                prompt_version=prompts.PROMPT_VERSION,
                is_fixture=False,
                settings=answers_depend_on,
            )
        return cls(
            model,
            processor,
            info=info,
            device=device,
            max_new_tokens=settings.max_new_tokens,
            max_caption_tokens=settings.max_caption_tokens,
            image_max_pixels=settings.image_max_pixels,
            image_min_pixels=settings.image_min_pixels,
            # On a GPU the warm-up batch is the largest batch, so its graphs and compiles exist before work.
            warmup_batch_size=settings.batch_max_size
            if device.type == "cuda"
            else min(settings.batch_max_size, 8),
            # bitsandbytes kernels are not capturable; quantized models decode eagerly.
            use_cuda_graphs=settings.cuda_graphs and settings.quantization == "none",
            compile_decode=settings.compile_decode,
            decode_cache_gib=settings.decode_cache_gib,
        )

    # -- interface ---------------------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        """Name, revision and prompt version of the loaded model."""
        return self._info

    @property
    def device(self) -> torch.device:
        """Device the model runs on."""
        return self._device

    def moderate(self, requests: list[EngineRequest]) -> list[EngineResult]:
        """Judge a batch: one scoring forward pass and one batched generation for all requests."""
        if not requests:
            return []
        images = list(self._image_pool.map(self._prepare, requests))
        languages = [request_language(r) for r in requests]
        with self._lock, torch.inference_mode():
            scored, texts, token_counts = self._judge_fitting(requests, images, languages)
        if all(s is None for s in scored):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory judging each submission alone")
        results: list[EngineResult | None] = []
        for s, text, count, language in zip(scored, texts, token_counts, languages, strict=True):
            if s is None:
                results.append(None)
                continue
            description, visible, explanation = parse_description(
                text, language, s.conflict_score, s.category_scores
            )
            results.append(
                EngineResult(
                    description=description,
                    visible_text=visible,
                    explanation=explanation,
                    conflict_score=s.conflict_score,
                    confidence=confidence_from(s.conflict_score, s.conflict_mass),
                    category_scores=dict(s.category_scores),
                    generated_tokens=count,
                )
            )
        if any(r is None for r in results):
            raise BatchPartlyFailed(results, "GPU out of memory judging this submission alone")
        return [r for r in results if r is not None]

    def health(self) -> EngineHealth:
        """Run a small batched inference (2 synthetic images: the batched path) and report the outcome."""
        started = time.perf_counter()
        requests = [
            EngineRequest(
                image=synthetic_image(64, 64 + 32 * i, seed=i),
                caption="Health check: a colourful gradient.",
                categories=prompts.DEFAULT_CATEGORIES[:2],
            )
            for i in range(2)
        ]
        try:
            results = self.moderate(requests)
        except Exception as exc:  # health reports failures instead of raising them
            logger.exception("engine health check failed")
            return EngineHealth(
                ok=False, detail=f"inference failed: {type(exc).__name__}: {exc}", device=str(self._device)
            )
        scores = [v for r in results for v in (r.conflict_score, r.confidence, *r.category_scores.values())]
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in scores):
            return EngineHealth(ok=False, detail=f"scores out of range: {scores}", device=str(self._device))
        elapsed_ms = (time.perf_counter() - started) * 1000
        detail = f"ok in {elapsed_ms:.0f} ms; model {self._info.name}"
        if self._info.is_fixture:
            detail += f"; {FIXTURE_WARNING}"
        return EngineHealth(ok=True, detail=detail, device=str(self._device))

    def warmup(self) -> None:
        """Run the largest batch in one prompt group (full-budget and small images), then a Chinese batch.

        Captions in one language share a prompt, and each group is judged as its own batch: a mixed warm-up
        batch would only ever reach half the largest size, leaving that size's buffers, graphs and memory
        check to the first real batch.
        """
        side = max(self._factor, math.isqrt(self._max_pixels))
        sizes = [(side, side) if i % 2 == 0 else (max(self._factor, side // 2), side) for i in range(4)]

        def batch(count: int, caption: str) -> list[EngineRequest]:
            return [
                EngineRequest(
                    image=synthetic_image(*sizes[i % len(sizes)], seed=i),
                    caption=caption,
                    categories=prompts.DEFAULT_CATEGORIES,
                )
                for i in range(count)
            ]

        started = time.perf_counter()
        self.moderate(batch(self._warmup_batch_size, "A street market at dusk with fruit stalls."))
        self.moderate(batch(min(2, self._warmup_batch_size), "傍晚的街头市场，有水果摊。"))
        logger.info(
            "warm-up batch of %d done in %.1fs", self._warmup_batch_size, time.perf_counter() - started
        )

    # -- internals ---------------------------------------------------------------------------------

    def _capped(self, caption: str) -> str:
        """The caption, cut to ``max_caption_tokens`` tokens: one long caption pads its whole batch to its length.

        4,000 characters can be 12,000 tokens (rare CJK characters take three each); the tenant's blocklist
        still reads the whole caption.
        """
        if len(caption.encode()) <= self._max_caption_tokens:
            return caption  # a byte-level token spans at least one byte: no need to tokenize it twice
        ids = self._tokenizer(caption, add_special_tokens=False)["input_ids"]
        if len(ids) <= self._max_caption_tokens:
            return caption
        return str(self._tokenizer.decode(ids[: self._max_caption_tokens], skip_special_tokens=True)) + " …"

    def _release_cached_memory(self) -> None:
        """Hand the allocator's cached GPU blocks back after running out of memory (nothing to do on a CPU)."""
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _prepare(self, request: EngineRequest) -> Image.Image:
        return prepare_image(request.image, self._max_pixels, self._min_pixels, factor=self._factor)

    def _judge_fitting(
        self, requests: Sequence[EngineRequest], images: Sequence[Image.Image], languages: Sequence[str]
    ) -> tuple[list[_Scored | None], list[str], list[int]]:
        """``_judge`` in chunks no larger than the device has room for, halving the chunk on out-of-memory.

        A batch larger than any that has fit before and that runs out of GPU memory sets a lasting cap
        (half its size), so a worker configured for a larger card keeps working on a smaller one. Running
        out at a size that has fit before is taken as transient (fragmentation): that call halves, the
        cap stays. Before either, the decode buffers kept for other batch shapes are freed and the same size
        is tried once more.
        """
        scored: list[_Scored | None] = []
        texts: list[str] = []
        counts: list[int] = []
        limit = self._fitting_batch or len(requests)
        cap_before = self._fitting_batch
        freed_at: int | None = None  # the chunk start for which the kept decode buffers were freed
        start = 0
        while start < len(requests):
            size = min(limit, len(requests) - start)
            end = start + size
            try:
                part = self._judge(requests[start:end], images[start:end], languages[start:end])
            except torch.cuda.OutOfMemoryError:
                out_of_memory = True
            else:
                out_of_memory = False
            if out_of_memory:  # outside the handler, so the failed attempt's tensors are already freed
                if freed_at != start and self._decoder.state_budget_bytes and self._decoder.held_state_bytes:
                    # Buffers kept for other batch shapes may be what filled the card: free them and try
                    # the same size once more before settling for less.
                    logger.warning(
                        "GPU out of memory judging %d submissions: freeing %.1f GiB of decode buffers kept "
                        "for other batch shapes and trying again",
                        size,
                        self._decoder.held_state_bytes / 2**30,
                    )
                    self._decoder.forget_all()
                    freed_at = start
                    self._release_cached_memory()
                    continue
                if size == 1:
                    # This one submission does not fit however small its batch: it fails alone, the others'
                    # results stand, and the halving it caused says nothing about the batch size.
                    logger.warning(
                        "GPU out of memory judging one submission alone: it fails, the batch goes on"
                    )
                    scored.append(None)
                    texts.append("")
                    counts.append(0)
                    self._fitting_batch = cap_before
                    start = end
                    limit = self._fitting_batch or len(requests)
                    self._release_cached_memory()
                    continue
                limit = size // 2
                if size > self._largest_fitted:
                    self._fitting_batch = max(limit, self._largest_fitted)
                    self._decoder.forget_batches_over(self._fitting_batch)
                    logger.warning(
                        "GPU out of memory judging %d submissions at once: batches of at most %d from now on",
                        size,
                        self._fitting_batch,
                    )
                else:
                    logger.warning("GPU out of memory judging %d submissions (has fit before): halving", size)
                self._release_cached_memory()
                continue
            self._largest_fitted = max(self._largest_fitted, size)
            scored += part[0]
            texts += part[1]
            counts += part[2]
            start = end
        return scored, texts, counts

    def _single_token_ids(self, variants: Sequence[str]) -> list[int]:
        ids: set[int] = set()
        for variant in variants:
            encoded = self._tokenizer.encode(variant, add_special_tokens=False)
            if len(encoded) == 1:
                ids.add(int(encoded[0]))
        return sorted(ids)

    def _chat_texts(
        self, images: Sequence[Image.Image], systems: Sequence[str], users: Sequence[str]
    ) -> list[str]:
        conversations = [
            [
                {"role": "system", "content": [{"type": "text", "text": system}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]},
            ]
            for system, user in zip(systems, users, strict=True)
        ]
        texts = self._processor.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
        return [texts] if isinstance(texts, str) else list(texts)

    def _encode(self, texts: list[str], images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Token ids (left-padded), attention mask, pixel patches and grids, all on the engine's device.

        What ``Qwen3VLProcessor`` returns with ``do_resize=False`` (``prepare_image`` has already sized every
        image within our budget), except that the pixels are normalised and patched on the device.
        """
        pixel_values, grid_thw = pixel_patches(images, self._patch_spec, self._device, self._image_pool)
        expanded = []
        for text, image in zip(texts, images, strict=True):
            if text.count(_IMAGE_PAD) != 1:
                raise ValueError("each prompt must hold exactly one image placeholder")
            expanded.append(text.replace(_IMAGE_PAD, _IMAGE_PAD * self._patch_spec.tokens(*image.size)))
        tokens = self._tokenizer(expanded, padding=True, return_tensors="pt", add_special_tokens=False)
        return {
            "input_ids": tokens["input_ids"].to(self._device),
            "attention_mask": tokens["attention_mask"].to(self._device),
            "pixel_values": pixel_values,
            "image_grid_thw": grid_thw,
        }

    def _answer_block(self, keys: tuple[str, ...]) -> tuple[list[int], list[int]]:
        """Token ids of the forced answer block for these keys, and the index of each answer token."""
        cached = self._blocks.get(keys)
        if cached is None:
            text, spans = prompts.judge_answer_block(keys)
            encoded = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = [(int(a), int(b)) for a, b in encoded["offset_mapping"]]
            cached = ([int(i) for i in encoded["input_ids"]], [_token_at(offsets, span) for span in spans])
            self._blocks[keys] = cached
        return cached

    def _judge_groups(
        self,
        requests: Sequence[EngineRequest],
        images: Sequence[Image.Image],
        languages: Sequence[str],
        systems: Sequence[str],
    ) -> tuple[list[_Scored], list[str], list[int]]:
        """Judge rows with different prefixes (languages, tenant categories) as one sub-batch per prefix."""
        order: dict[str, list[int]] = {}
        for index, system in enumerate(systems):
            order.setdefault(system, []).append(index)
        scored: list[Any] = [None] * len(requests)
        texts: list[Any] = [None] * len(requests)
        counts: list[Any] = [None] * len(requests)
        for indices in order.values():
            part = self._judge(
                [requests[i] for i in indices], [images[i] for i in indices], [languages[i] for i in indices]
            )
            for j, i in enumerate(indices):
                scored[i], texts[i], counts[i] = part[0][j], part[1][j], part[2][j]
        return scored, texts, counts

    def _vision(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Merged image embeddings and the per-layer deepstack features, across transformers 5.x versions."""
        visual = self._model.model.visual
        output = visual(pixel_values.type(visual.dtype), grid_thw=grid_thw)
        if isinstance(output, tuple):
            return output[0], list(output[1])
        return output.pooler_output, list(output.deepstack_features)

    def _suffix_positions(
        self, ids: torch.Tensor, mask: torch.Tensor, grid_thw: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE positions (3, B, S) of the suffix rows after a ``start``-token prefix, and each row's next one.

        Text tokens get the same position on all three axes; the image's tokens share the temporal one and
        count rows and columns of merged patches on the other two, as Qwen3-VL's ``get_rope_index`` does.
        """
        batch, seq = ids.shape
        positions = torch.zeros(3, batch, seq, dtype=torch.long)
        following = torch.zeros(batch, dtype=torch.long)
        ids_cpu, mask_cpu, grids = ids.cpu(), mask.cpu().bool(), grid_thw.cpu().tolist()
        for row in range(batch):
            real = ids_cpu[row][mask_cpu[row]]
            image = (real == self._image_token_id).nonzero().flatten()
            _, grid_h, grid_w = (int(v) for v in grids[row])
            grid_h, grid_w = grid_h // self._merge, grid_w // self._merge
            first, count = int(image[0]), int(image.numel())
            before = torch.arange(first).expand(3, -1) + start
            base = start + first
            k = torch.arange(count)
            vision = torch.stack([torch.full((count,), base), base + k // grid_w, base + k % grid_w])
            after_start = base + max(grid_h, grid_w)
            after = torch.arange(real.numel() - first - count).expand(3, -1) + after_start
            row_positions = torch.cat([before, vision, after], dim=1)
            positions[:, row, mask_cpu[row]] = row_positions
            following[row] = int(row_positions.max()) + 1
        return positions.to(self._device), following.to(self._device)

    def _stopwatch(self) -> Any:
        """A function that records the time since its previous call under a name, when profiling."""
        last = [time.perf_counter()]

        def mark(name: str) -> None:
            if not self.profile:
                return
            if self._device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.timings[name] = self.timings.get(name, 0.0) + now - last[0]
            last[0] = now

        if self.profile:
            self.timings = {}
        return mark

    def _judge(
        self, requests: Sequence[EngineRequest], images: Sequence[Image.Image], languages: Sequence[str]
    ) -> tuple[list[_Scored], list[str], list[int]]:
        """One prefill, greedy decoding of the labelled lines, then one forced pass over the answer block."""
        mark = self._stopwatch()
        systems = [
            prompts.judge_system(r.categories, lang) for r, lang in zip(requests, languages, strict=True)
        ]
        if len(set(systems)) > 1:
            return self._judge_groups(requests, images, languages, systems)
        users = [
            prompts.judge_user(self._capped(r.caption), lang)
            for r, lang in zip(requests, languages, strict=True)
        ]
        texts = self._chat_texts(images, systems, users)
        cut = texts[0].index(_USER_HEADER) + len(_USER_HEADER)
        prefix_ids = tuple(
            int(i) for i in self._tokenizer(texts[0][:cut], add_special_tokens=False)["input_ids"]
        )
        batch = self._encode([t[cut:] for t in texts], images)
        suffix_ids, suffix_mask = batch["input_ids"], batch["attention_mask"]
        visual_mask = suffix_ids == self._image_token_id
        positions, next_positions = self._suffix_positions(
            suffix_ids, suffix_mask, batch["image_grid_thw"], len(prefix_ids)
        )
        mark("encode")
        image_embeds, deepstack = self._vision(batch["pixel_values"], batch["image_grid_thw"])
        mark("vision")
        keys_per_request = [
            (prompts.CONFLICT_KEY, *(prompts.answer_key(c) for c in r.categories)) for r in requests
        ]
        blocks = [self._answer_block(keys) for keys in keys_per_request]
        block_len = 1 + max(len(ids) for ids, _ in blocks)
        state, last_hidden = self._decoder.prefill(
            prefix_ids,
            suffix_ids,
            suffix_mask,
            positions,
            visual_mask,
            image_embeds,
            deepstack,
            max_new_tokens=self._max_new_tokens,
            extra_slots=block_len,
        )
        first_logits = self._model.lm_head(last_hidden).float()
        if self._suppress_ids:
            first_logits[:, self._suppress_ids] = float("-inf")
        if self._min_new_tokens > 0:
            first_logits[:, self._eos_ids] = float("-inf")
        first = first_logits.argmax(dim=-1)
        mark("prefill")
        tokens, next_slot = self._decoder.decode(
            state,
            first,
            next_positions,
            max_new_tokens=self._max_new_tokens,
            min_new_tokens=self._min_new_tokens,
        )
        mark("decode")
        prompt_len = suffix_ids.shape[1]  # row slots before the first generated token
        steps = tokens.shape[1] - 1  # tokens in the cache; the last one is fed with the block
        first_eos = self._decoder.reply_end.first_stop(tokens)  # EOS, or the blank line after the explanation
        positions = torch.arange(tokens.shape[1], device=self._device).unsqueeze(0)
        keep = positions < first_eos.unsqueeze(1)
        block_ids = torch.full(
            (len(requests), block_len), self._pad_id, dtype=torch.long, device=self._device
        )
        block_mask = torch.zeros(len(requests), block_len, dtype=torch.bool, device=self._device)
        block_ids[:, 0] = tokens[:, -1]
        block_mask[:, 0] = keep[:, -1]
        rows: list[int] = []
        cols: list[int] = []
        for row, (ids, answer_index) in enumerate(blocks):
            block_ids[row, 1 : 1 + len(ids)] = torch.tensor(ids, device=self._device)
            block_mask[row, 1 : 1 + len(ids)] = True
            for j in answer_index:
                rows.append(row)
                cols.append(j)  # block position 1 + j holds the answer; the state before it predicts it
        hidden = self._decoder.teacher_force(
            state,
            block_ids,
            block_mask,
            keep[:, :steps],
            start_slot=next_slot,
            # Each row's answers follow its own last kept token, wherever the batch's longest row ended:
            # otherwise a submission's scores would depend on how long its companions wrote. Block slot 0
            # (the last generated token) is masked out for a row that stopped, so it may share a position.
            start_positions=next_positions + first_eos - 1,
            prompt_len=prompt_len,
        )
        picked = hidden[torch.tensor(rows, device=self._device), torch.tensor(cols, device=self._device)]
        log_probs = torch.log_softmax(self._model.lm_head(picked).float(), dim=-1)
        lse_yes = torch.logsumexp(log_probs[:, self._yes_ids], dim=-1)
        lse_no = torch.logsumexp(log_probs[:, self._no_ids], dim=-1)
        score = torch.sigmoid(lse_yes - lse_no).cpu().tolist()
        mass = torch.exp(torch.logaddexp(lse_yes, lse_no)).clamp(0.0, 1.0).cpu().tolist()
        mark("answers")

        results: list[_Scored] = []
        k = 0
        for request, keys in zip(requests, keys_per_request, strict=True):
            category_scores = {
                category.name: float(score[k + offset])
                for category, offset in zip(request.categories, range(1, len(keys)), strict=True)
            }
            results.append(_Scored(float(score[k]), float(mass[k]), category_scores))
            k += len(keys)
        token_rows = tokens.tolist()
        counts = [min(int(e) + 1, len(r)) for e, r in zip(first_eos.tolist(), token_rows, strict=True)]
        # The ending token is decoded too: a blank line may share it with the explanation's last word.
        texts = [
            self._tokenizer.decode(r[: int(e) + 1], skip_special_tokens=True).rstrip()
            for r, e in zip(token_rows, first_eos.tolist(), strict=True)
        ]
        return results, texts, counts


def _token_at(offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> int:
    """Index of the token whose character range ends exactly at the answer word's end and covers its start."""
    start, end = span
    for index, (a, b) in enumerate(offsets):
        if a <= start < b:
            if b != end:
                raise RuntimeError(f"answer word at {span} is not a single token (token covers {a}..{b})")
            return index
    raise RuntimeError(f"no token covers answer span {span}")


def _folder_revision(path: Path) -> str:
    """A revision for a model in a local folder: a digest of its configuration and of its weight files' sizes
    and modification times (hashing gigabytes of weights at every start would take minutes)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        stat = file.stat()
        digest.update(f"{relative}\0{stat.st_size}\0".encode())
        if file.suffix == ".json":
            digest.update(file.read_bytes())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
    return f"local-{digest.hexdigest()[:16]}"


def _fixture_revision(path: Path) -> str:
    import json

    try:
        marker = json.loads((path / FIXTURE_MARKER).read_text(encoding="utf-8"))
        return f"fixture-seed-{int(marker.get('seed', 0))}"
    except (OSError, ValueError, TypeError):
        return "fixture"


__all__ = [
    "FIXTURE_WARNING",
    "EngineConfigError",
    "TransformersEngine",
    "binary_entropy",
    "confidence_from",
    "parse_description",
    "request_language",
]
