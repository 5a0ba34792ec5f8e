"""The openai engine backend over real HTTP: our OpenAI-compatible server serving the fixture model.

The fixture model has random weights, so " yes" and " no" are almost never among its 20 most likely next
tokens; the engine under test therefore asks for the whole vocabulary as ``top_logprobs`` (our server
allows it; vLLM would need ``--max-logprobs``). One test keeps the default 20 to check the 0.5 / mass 0
fallback.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from moderation.engine import load_engine, prompts
from moderation.engine.base import CategorySpec, EngineRequest, EngineResult
from moderation.engine.openai_engine import (
    OpenAIEngine,
    OpenAIEngineError,
    answer_prefixes,
    answer_score,
)
from moderation.engine.scoring import binary_entropy, confidence_from, request_language
from tests.openai_server import serve

from .conftest import TEST_MAX_NEW_TOKENS, engine_settings
from .test_transformers_engine import CATEGORIES, TENANT_CATEGORY, _request

#: Same model, same prompts, same tokens, fp32 on the CPU: observed differences are ~1e-6.
PARITY_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def compat(fixture_model_dir: Path) -> Iterator[tuple[str, Any]]:
    """Our OpenAI-compatible server on the fixture model: (base URL with /v1, the app's model runner)."""
    import torch

    from api.openai_compat import create_openai_compat_app

    torch.set_num_threads(2)
    app = create_openai_compat_app(fixture_model_dir)
    with serve(app) as url:
        yield f"{url}/v1", app.state.runner


@pytest.fixture(scope="module")
def remote(compat: tuple[str, Any]) -> Iterator[OpenAIEngine]:
    """OpenAIEngine asking for full-vocabulary top_logprobs."""
    url, runner = compat
    engine = OpenAIEngine(
        url,
        runner.name,
        max_new_tokens=TEST_MAX_NEW_TOKENS,
        top_logprobs=runner.vocab_size,
        concurrency=4,
        timeout_seconds=120,
    )
    yield engine
    engine.close()


def _assert_valid(result: EngineResult, categories: tuple[CategorySpec, ...]) -> None:
    assert set(result.category_scores) == {c.name for c in categories}
    for value in (result.conflict_score, result.confidence, *result.category_scores.values()):
        assert math.isfinite(value) and 0.0 <= value <= 1.0
    assert 0 < result.generated_tokens <= TEST_MAX_NEW_TOKENS
    assert result.explanation.strip()


# -- pure helpers -----------------------------------------------------------------------------------


def test_both_backends_share_one_scoring_module() -> None:
    from moderation.engine import openai_engine as oe
    from moderation.engine import scoring
    from moderation.engine import transformers_engine as te

    for name in ("YES_VARIANTS", "NO_VARIANTS", "confidence_from", "request_language"):
        assert getattr(oe, name) is getattr(scoring, name) is getattr(te, name)
    image = Image.new("RGB", (32, 32))
    for caption, language, expected in (("A cat", "en", "en"), ("一只猫", "en", "zh"), ("", "zh-CN", "zh")):
        assert request_language(EngineRequest(image, caption, CATEGORIES, language=language)) == expected
    assert binary_entropy(0.5) == pytest.approx(math.log(2)) and binary_entropy(1.0) == 0.0
    assert confidence_from(0.5, 1.0) == pytest.approx(0.0) and confidence_from(1.0, 1.3) == 1.0


def test_answer_score_from_top_logprobs() -> None:
    top = [
        {"token": " yes", "logprob": math.log(0.3)},
        {"token": "Yes", "logprob": math.log(0.1)},
        {"token": " no", "logprob": math.log(0.4)},
        {"token": " maybe", "logprob": math.log(0.2)},
    ]
    answer = answer_score(top)
    assert answer.score == pytest.approx(0.5)
    assert answer.mass == pytest.approx(0.8)
    only_no = answer_score([{"token": "no", "logprob": -0.1}, {"token": "x", "logprob": -3.0}])
    assert only_no.score == 0.0 and only_no.mass == pytest.approx(math.exp(-0.1))
    neither = answer_score([{"token": "x", "logprob": -0.1}, {"token": " yes", "logprob": None}])
    assert (neither.score, neither.mass) == (0.5, 0.0)


def test_answer_prefixes_end_before_the_answer_token() -> None:
    keys = ("conflict", "sexual", "gambling")
    assert answer_prefixes(keys) == [
        "\n\nconflict:",
        "\n\nconflict: no\nsexual:",
        "\n\nconflict: no\nsexual: no\ngambling:",
    ]


# -- end to end over HTTP ---------------------------------------------------------------------------


def test_results_one_per_request_every_category_scored(remote: OpenAIEngine) -> None:
    tenant_only = (TENANT_CATEGORY,)
    requests = [
        _request((160, 160), "A bowl of noodles.", 11),
        _request((96, 320), "一碗面条。", 1),
        _request((64, 96), "", 3, tenant_only),
    ]
    results = remote.moderate(requests)
    assert len(results) == len(requests)
    _assert_valid(results[0], CATEGORIES)
    _assert_valid(results[1], CATEGORIES)
    _assert_valid(results[2], tenant_only)
    assert remote.moderate([]) == []
    scores = [s for r in results[:2] for s in r.category_scores.values()]
    assert len({round(s, 6) for s in scores}) > 1  # real probabilities, not the 0.5 fallback
    # Deterministic: the same batch gives the same verdicts.
    assert remote.moderate(requests[:2]) == results[:2]


def test_matches_the_transformers_engine(remote: OpenAIEngine, engine: Any, compat: tuple[str, Any]) -> None:
    """Same verdicts as the in-process engine when the server sees the same tokens.

    The server re-tokenizes the generated text together with the forced block; the in-process engine
    conditions on the generated token ids and the separately tokenized block. Random fixture text is often
    not in canonical tokenization (e.g. "พักผ่อน" generated as 2 tokens re-tokenizes as 3), so for each
    request the test first checks whether the two token sequences agree. Where they do, every score
    agrees to 1e-4; where they do not, the generated text still agrees exactly. Which requests agree
    depends on what the random weights write for the prompt's wording, so there are several of each
    language, and at least one of each must be compared score by score.
    """
    url, runner = compat
    english = [
        _request((160, 160), "A dog in a park.", 1),
        _request((160, 160), "A bowl of noodles.", 11),
        _request((128, 192), "My new bike.", 5),
        _request((192, 128), "Sunset at the beach.", 7),
    ]
    chinese = [
        _request((160, 160), "一碗面条。", 1),
        _request((128, 192), "我家的猫在睡觉。", 4),
        _request((192, 128), "周末去爬山。", 9),
    ]
    requests = english + chinese
    ours = remote.moderate(requests)
    theirs = engine.moderate(requests)
    same_tokens = [_server_tokens_match(url, runner, remote, r) for r in requests]
    # English and Chinese are both compared score by score.
    assert any(same_tokens[: len(english)]) and any(same_tokens[len(english) :]), same_tokens
    for a, b, same in zip(ours, theirs, same_tokens, strict=True):
        assert (a.description, a.visible_text, a.generated_tokens) == (
            b.description,
            b.visible_text,
            b.generated_tokens,
        )
        if not same:
            continue
        assert a.conflict_score == pytest.approx(b.conflict_score, abs=PARITY_TOLERANCE)
        assert a.confidence == pytest.approx(b.confidence, abs=PARITY_TOLERANCE)
        assert a.category_scores.keys() == b.category_scores.keys()
        for name, value in a.category_scores.items():
            assert value == pytest.approx(b.category_scores[name], abs=PARITY_TOLERANCE), name
        assert a.explanation == b.explanation


def _server_tokens_match(url: str, runner: Any, remote: OpenAIEngine, request: EngineRequest) -> bool:
    """Whether generated ids + forced block ids equal the server's tokenization of text + block."""
    conversation = remote._conversation(request, request_language(request))
    reply = httpx.post(
        f"{url}/chat/completions",
        json={
            "model": runner.name,
            "messages": conversation,
            "max_tokens": TEST_MAX_NEW_TOKENS,
            "temperature": 0,
            "logprobs": True,
            "return_tokens_as_token_ids": True,
        },
        timeout=60,
    ).json()
    choice = reply["choices"][0]
    ids = [int(e["token"].removeprefix("token_id:")) for e in choice["logprobs"]["content"]]
    ids = [i for i in ids if i not in runner.eos_ids]
    keys = (prompts.CONFLICT_KEY, *(prompts.answer_key(c) for c in request.categories))
    block, _ = prompts.judge_answer_block(keys)
    tokenizer = runner.tokenizer
    separate = ids + tokenizer(block, add_special_tokens=False)["input_ids"]
    joint = tokenizer(choice["message"]["content"] + block, add_special_tokens=False)["input_ids"]
    return bool(joint == separate)


def test_default_top20_falls_back_to_half(compat: tuple[str, Any]) -> None:
    url, runner = compat
    engine = OpenAIEngine(url, runner.name, max_new_tokens=4)
    try:
        [result] = engine.moderate([_request((64, 64), "Cat.", 2, (TENANT_CATEGORY,))])
    finally:
        engine.close()
    # The random model puts yes/no outside its top 20: score 0.5, mass 0, confidence 0.
    assert result.conflict_score == 0.5 and result.confidence == 0.0
    assert result.category_scores == {"gambling": 0.5}


def test_factory_info_and_health(compat: tuple[str, Any], fixture_model_dir: Path) -> None:
    url, runner = compat
    settings = engine_settings(
        fixture_model_dir,
        engine_backend="openai",
        openai_base_url=url,
        openai_model=runner.name,
        max_new_tokens=4,
    )
    engine = load_engine(settings)
    try:
        assert isinstance(engine, OpenAIEngine)
        info = engine.info
        assert info.name == runner.name == f"fixture:{fixture_model_dir.name}"
        assert info.revision == "openai:127.0.0.1"
        assert info.prompt_version == prompts.PROMPT_VERSION
        assert info.is_fixture is True
        health = engine.health()
        assert health.ok, health.detail
        assert "FIXTURE" in health.detail
        assert health.device == f"openai:{url}"
    finally:
        engine.close()
    wrong = OpenAIEngine(url, "no-such-model", max_retries=0)
    try:
        health = wrong.health()
        assert not health.ok and "not served" in health.detail
    finally:
        wrong.close()


# -- failures: a stub server ------------------------------------------------------------------------


class _Stub:
    """A tiny OpenAI-like HTTP server: answers from a script of (status, body) and counts calls."""

    def __init__(self, script: list[tuple[int, dict[str, Any]]], default: tuple[int, dict[str, Any]]):
        self.script = list(script)
        self.default = default
        self.calls = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                with stub.lock:
                    stub.calls += 1
                    status, body = stub.script.pop(0) if stub.script else stub.default
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Stub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _reply(logprobs: bool = True) -> dict[str, Any]:
    top = [{"token": " yes", "logprob": math.log(0.75)}, {"token": " no", "logprob": math.log(0.25)}]
    return {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Description: a cat"},
                "finish_reason": "length",
                "logprobs": {"content": [{"token": " yes", "logprob": -0.3, "top_logprobs": top}]}
                if logprobs
                else None,
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
    }


_UNAVAILABLE = (503, {"error": {"message": "overloaded", "type": "server_error"}})


def test_retries_503_then_succeeds() -> None:
    with _Stub([_UNAVAILABLE, _UNAVAILABLE], (200, _reply())) as stub:
        engine = OpenAIEngine(stub.url, "m", max_retries=3, backoff_seconds=0.01, concurrency=1)
        try:
            [result] = engine.moderate([_request((64, 64), "Cat.", 1, (TENANT_CATEGORY,))])
        finally:
            engine.close()
    assert stub.calls == 2 + 1 + 2  # two 503s, then the generation and two answers
    assert result.conflict_score == pytest.approx(0.75)
    assert result.category_scores["gambling"] == pytest.approx(0.75)
    assert result.description == "a cat" and result.generated_tokens == 3


def test_gives_up_after_retries() -> None:
    with _Stub([], _UNAVAILABLE) as stub:
        engine = OpenAIEngine(stub.url, "m", max_retries=2, backoff_seconds=0.01)
        try:
            with pytest.raises(OpenAIEngineError, match=r"HTTP 503 after 3 attempt\(s\): overloaded"):
                engine.moderate([_request((64, 64), "Cat.", 1)])
        finally:
            engine.close()
    assert stub.calls == 3


def test_client_errors_are_not_retried() -> None:
    bad = (400, {"error": {"message": "Unrecognized request argument: continue_final_message"}})
    with _Stub([], bad) as stub:
        engine = OpenAIEngine(stub.url, "m", max_retries=3, backoff_seconds=0.01)
        try:
            with pytest.raises(OpenAIEngineError, match="continue_final_message"):
                engine.moderate([_request((64, 64), "Cat.", 1)])
        finally:
            engine.close()
    assert stub.calls == 1


def test_connection_refused_is_retried_then_reported() -> None:
    from tests.openai_server import free_port

    engine = OpenAIEngine(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=1, backoff_seconds=0.01)
    try:
        with pytest.raises(OpenAIEngineError, match="after 2 attempts"):
            engine.moderate([_request((64, 64), "Cat.", 1)])
        assert not engine.health().ok
    finally:
        engine.close()


def test_server_without_logprobs_is_a_clear_error() -> None:
    with _Stub([], (200, _reply(logprobs=False))) as stub:
        engine = OpenAIEngine(stub.url, "m", backoff_seconds=0.01)
        try:
            with pytest.raises(OpenAIEngineError, match="returned no top_logprobs"):
                engine.moderate([_request((64, 64), "Cat.", 1, (TENANT_CATEGORY,))])
        finally:
            engine.close()
