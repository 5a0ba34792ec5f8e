"""Moderation engine on any OpenAI-compatible chat-completions server with logprobs (vLLM, SGLang, ...).

The same judging as the in-process transformers engine, over HTTP:

1. **Generate** — ``POST /v1/chat/completions`` with the same chat as the transformers engine (system:
   ``prompts.judge_system``; user: the prepared image as a lossless PNG ``data:`` URL, then
   ``prompts.judge_user``), greedy (``temperature: 0``),
   ``max_tokens = settings.max_new_tokens``. The reply is the labelled description / visible text /
   explanation, parsed by the same ``parse_description``.
2. **Score** — one call per answer: the assistant message is the generated text followed by the forced
   answer block (``"\\n\\nconflict: no\\n<category>: no…"``) cut just before the answer token, continued
   with the vLLM / SGLang extension fields ``continue_final_message: true, add_generation_prompt: false``
   and ``max_tokens: 1, logprobs: true, top_logprobs: k``. Earlier answers are sent as "no", exactly like
   the transformers engine's forced block, so every answer is conditioned on the same text. The score is
   ``P(yes) / (P(yes) + P(no))`` summed over the same spellings (``" yes"``, ``"Yes"``, ...) found among the
   top-k log-probabilities; a spelling outside the top k counts as 0, and when neither yes nor no is there
   the score is 0.5 with mass 0 (so confidence 0). The answer calls of a batch run concurrently; a server
   with prefix caching computes the shared prompt once.

Confidence is the transformers engine's: ``mass × (1 − H(conflict_score) / ln 2)`` at the conflict answer.

Differences from the in-process engine that can move scores slightly: the server re-tokenizes the
generated text (the in-process engine conditions on the generated token ids, and tokenizes the forced
block separately), and a server may resize images itself. See README, "Engine backends".
"""

from __future__ import annotations

import base64
import io
import logging
import math
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from PIL import Image

from moderation.engine import prompts
from moderation.engine.base import EngineHealth, EngineRequest, EngineResult, ModelInfo, ModerationEngine
from moderation.engine.images import VISUAL_TOKEN_FACTOR, prepare_image, synthetic_image
from moderation.engine.scoring import (
    NO_VARIANTS,
    YES_VARIANTS,
    confidence_from,
    cut_reply,
    parse_description,
    request_language,
)

if TYPE_CHECKING:
    from moderation.config import Settings

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class OpenAIEngineError(RuntimeError):
    """The server answered with an error, or without what the engine needs (e.g. no logprobs)."""


@dataclass(frozen=True)
class _Answer:
    score: float
    mass: float


def answer_score(top_logprobs: Sequence[dict[str, Any]]) -> _Answer:
    """P(yes) / (P(yes) + P(no)) and P(yes) + P(no) from one position's top log-probabilities."""
    yes = no = 0.0
    for entry in top_logprobs:
        token = entry.get("token")
        logprob = entry.get("logprob")
        if not isinstance(token, str) or not isinstance(logprob, int | float) or not math.isfinite(logprob):
            continue
        if token in YES_VARIANTS:
            yes += math.exp(logprob)
        elif token in NO_VARIANTS:
            no += math.exp(logprob)
    mass = yes + no
    if mass <= 0.0:
        return _Answer(0.5, 0.0)
    return _Answer(yes / mass, min(mass, 1.0))


def answer_prefixes(keys: Sequence[str]) -> list[str]:
    """For each answer: the forced block up to (not including) the answer token.

    The answer token is the word with its leading space (``" no"``), as the transformers engine reads it,
    so the prefix ends at the colon.
    """
    block, spans = prompts.judge_answer_block(keys)
    prefixes = []
    for start, _end in spans:
        cut = start
        while cut > 0 and block[cut - 1] == " ":
            cut -= 1
        prefixes.append(block[:cut])
    return prefixes


def image_data_url(image: Image.Image, image_format: str = "PNG") -> str:
    """``data:`` URL of the image (PNG keeps the prepared pixels exact; JPEG is smaller)."""
    buffer = io.BytesIO()
    fmt = image_format.upper()
    if fmt == "JPEG":
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"data:image/{fmt.lower()};base64,{encoded}"


class OpenAIEngine(ModerationEngine):
    """Moderation over an OpenAI-compatible server: greedy description plus teacher-forced yes/no scoring."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_seconds: float = 60.0,
        concurrency: int = 8,
        max_new_tokens: int = 256,
        image_max_pixels: int = 512 * 512,
        image_min_pixels: int = 32 * 32,
        top_logprobs: int = 20,
        max_retries: int = 3,
        backoff_seconds: float = 0.5,
        image_format: str = "PNG",
        stop: Sequence[str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._model = model
        self._max_new_tokens = max_new_tokens
        self._max_pixels = image_max_pixels
        self._min_pixels = image_min_pixels
        self._top_logprobs = max(1, top_logprobs)
        self._max_retries = max(0, max_retries)
        self._backoff = max(0.0, backoff_seconds)
        self._image_format = image_format
        self._stop = list(stop) if stop else None
        self._concurrency = max(1, concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            base_url=self._base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_seconds, connect=min(10.0, timeout_seconds)),
            limits=httpx.Limits(
                max_connections=self._concurrency, max_keepalive_connections=self._concurrency
            ),
            transport=transport,
        )
        self._pool = ThreadPoolExecutor(max_workers=self._concurrency, thread_name_prefix="openai-engine")
        host = httpx.URL(self._base_url).host or self._base_url
        self._info = ModelInfo(
            name=model,
            revision=f"openai:{host}",
            prompt_version=prompts.PROMPT_VERSION,
            is_fixture=model.startswith("fixture:"),
        )
        self._closed = threading.Event()

    @classmethod
    def load(cls, settings: Settings) -> OpenAIEngine:
        """An engine for ``settings.openai_base_url`` / ``settings.openai_model``."""
        return cls(
            settings.openai_base_url,
            settings.openai_model,
            api_key=settings.openai_api_key,
            timeout_seconds=settings.openai_timeout_seconds,
            concurrency=settings.openai_concurrency,
            max_new_tokens=settings.max_new_tokens,
            image_max_pixels=settings.image_max_pixels,
            image_min_pixels=settings.image_min_pixels,
            top_logprobs=settings.openai_top_logprobs,
            max_retries=settings.openai_max_retries,
        )

    # -- interface ---------------------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        """Served model name, ``openai:<host>`` as revision, and the prompt version."""
        return self._info

    def close(self) -> None:
        """Close the HTTP connection pool and the worker threads."""
        if not self._closed.is_set():
            self._closed.set()
            self._pool.shutdown(wait=True)
            self._client.close()

    def moderate(self, requests: list[EngineRequest]) -> list[EngineResult]:
        """Judge a batch: one generation per request, then one scoring call per answer, all concurrent."""
        if not requests:
            return []
        languages = [request_language(r) for r in requests]
        conversations = [
            self._conversation(r, language) for r, language in zip(requests, languages, strict=True)
        ]
        # Cut where the in-process engine stops decoding, so both score the same text.
        generations = [
            (cut_reply(text), tokens) for text, tokens in self._pool.map(self._generate, conversations)
        ]

        jobs: list[tuple[int, list[dict[str, Any]]]] = []
        for index, (request, conversation, (text, _)) in enumerate(
            zip(requests, conversations, generations, strict=True)
        ):
            keys = (prompts.CONFLICT_KEY, *(prompts.answer_key(c) for c in request.categories))
            for prefix in answer_prefixes(keys):
                jobs.append((index, [*conversation, {"role": "assistant", "content": text + prefix}]))
        answers = list(self._pool.map(lambda job: self._score(job[1]), jobs))

        results: list[EngineResult] = []
        k = 0
        for request, language, (text, tokens) in zip(requests, languages, generations, strict=True):
            conflict = answers[k]
            category_scores = {c.name: answers[k + 1 + i].score for i, c in enumerate(request.categories)}
            k += 1 + len(request.categories)
            description, visible, explanation = parse_description(
                text, language, conflict.score, category_scores
            )
            results.append(
                EngineResult(
                    description=description,
                    visible_text=visible,
                    explanation=explanation,
                    conflict_score=conflict.score,
                    confidence=confidence_from(conflict.score, conflict.mass),
                    category_scores=category_scores,
                    generated_tokens=tokens,
                )
            )
        return results

    def health(self) -> EngineHealth:
        """``GET /v1/models`` (the model must be listed) and one tiny inference."""
        device = f"openai:{self._base_url}"
        started = time.perf_counter()
        try:
            listed = self._request("GET", "/models").get("data") or []
            names = [m.get("id") for m in listed if isinstance(m, dict)]
            if self._model not in names:
                return EngineHealth(
                    ok=False, detail=f"model {self._model!r} not served (server lists {names})", device=device
                )
            [result] = self.moderate(
                [
                    EngineRequest(
                        image=synthetic_image(64, 64),
                        caption="Health check: a colourful gradient.",
                        categories=prompts.DEFAULT_CATEGORIES[:2],
                    )
                ]
            )
        except Exception as exc:  # health reports failures instead of raising them
            logger.exception("openai engine health check failed")
            return EngineHealth(
                ok=False, detail=f"inference failed: {type(exc).__name__}: {exc}", device=device
            )
        scores = [result.conflict_score, result.confidence, *result.category_scores.values()]
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in scores):
            return EngineHealth(ok=False, detail=f"scores out of range: {scores}", device=device)
        elapsed_ms = (time.perf_counter() - started) * 1000
        detail = f"ok in {elapsed_ms:.0f} ms; model {self._model}"
        if self._info.is_fixture:
            detail += "; FIXTURE MODEL IN USE — verdicts are random, not for production"
        return EngineHealth(ok=True, detail=detail, device=device)

    # -- internals ---------------------------------------------------------------------------------

    def _conversation(self, request: EngineRequest, language: str) -> list[dict[str, Any]]:
        image = prepare_image(request.image, self._max_pixels, self._min_pixels, factor=VISUAL_TOKEN_FACTOR)
        # The same chat as the transformers engine: every instruction in the system message (a prefix the
        # server's prefix cache shares across submissions), then the image and the quoted caption.
        return [
            {"role": "system", "content": prompts.judge_system(request.categories, language)},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(image, self._image_format)}},
                    {"type": "text", "text": prompts.judge_user(request.caption, language)},
                ],
            },
        ]

    def _generate(self, messages: list[dict[str, Any]]) -> tuple[str, int]:
        body: dict[str, Any] = {
            "model": self._model,
            "messages": messages,
            "temperature": 0,
            "max_tokens": self._max_new_tokens,
            "n": 1,
        }
        if self._stop:
            body["stop"] = self._stop
        reply = self._request("POST", "/chat/completions", body)
        choice = _first_choice(reply)
        text = (choice.get("message") or {}).get("content") or ""
        tokens = int((reply.get("usage") or {}).get("completion_tokens") or 0)
        return str(text), tokens

    def _score(self, messages: list[dict[str, Any]]) -> _Answer:
        body = {
            "model": self._model,
            "messages": messages,
            "continue_final_message": True,
            "add_generation_prompt": False,
            "temperature": 0,
            "max_tokens": 1,
            "n": 1,
            "logprobs": True,
            "top_logprobs": self._top_logprobs,
        }
        choice = _first_choice(self._request("POST", "/chat/completions", body))
        content = (choice.get("logprobs") or {}).get("content")
        top = content[0].get("top_logprobs") if isinstance(content, list) and content else None
        if not isinstance(top, list) or not top:
            raise OpenAIEngineError(
                f"the server at {self._base_url} returned no top_logprobs; the openai backend needs a "
                "chat-completions server that supports logprobs/top_logprobs and continue_final_message "
                "(e.g. vLLM, SGLang)"
            )
        return answer_score(top)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One API call with retries (exponential backoff and jitter) on connection errors and 5xx/429."""
        attempt = 0
        while True:
            try:
                response = self._client.request(method, path, json=body)
            except httpx.TransportError as exc:
                if attempt >= self._max_retries:
                    raise OpenAIEngineError(
                        f"{method} {self._base_url}{path} failed after {attempt + 1} attempts: {exc!r}"
                    ) from exc
                error: str = repr(exc)
                retry_after: float | None = None
            else:
                if response.status_code < 400:
                    try:
                        data = response.json()
                    except ValueError as exc:
                        raise OpenAIEngineError(f"{method} {path}: response is not JSON") from exc
                    if not isinstance(data, dict):
                        raise OpenAIEngineError(f"{method} {path}: response is not a JSON object")
                    return data
                message = _error_message(response)
                if response.status_code not in RETRY_STATUSES or attempt >= self._max_retries:
                    raise OpenAIEngineError(
                        f"{method} {self._base_url}{path} -> HTTP {response.status_code}"
                        f" after {attempt + 1} attempt(s): {message}"
                    )
                error = f"HTTP {response.status_code}: {message}"
                retry_after = _retry_after(response)
            delay = self._backoff * (2**attempt) * (0.5 + random.random() / 2)
            if retry_after is not None:
                delay = max(delay, min(retry_after, 30.0))
            logger.warning("%s %s failed (%s); retry %d in %.2fs", method, path, error, attempt + 1, delay)
            time.sleep(delay)
            attempt += 1


def _first_choice(reply: dict[str, Any]) -> dict[str, Any]:
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise OpenAIEngineError("the server's reply has no choices")
    return choices[0]


def _error_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
        if isinstance(data.get("message"), str):
            return str(data["message"])[:500]
    return response.text[:500]


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


__all__ = [
    "NO_VARIANTS",
    "YES_VARIANTS",
    "OpenAIEngine",
    "OpenAIEngineError",
    "answer_prefixes",
    "answer_score",
    "confidence_from",
    "request_language",
]
