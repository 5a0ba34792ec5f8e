"""Our OpenAI-compatible test server (api/openai_compat.py) over real HTTP, on a fixture model."""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.openai_server import serve

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _data_url(size: tuple[int, int] = (64, 64)) -> str:
    img = Image.new("RGB", size)
    img.putdata(
        [((x * 7) % 256, (y * 5) % 256, (x + y) % 256) for y in range(size[1]) for x in range(size[0])]
    )
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Any]]:
    """A client of the compat server on a fresh fixture model, and the server's model runner."""
    import torch

    from api.openai_compat import create_openai_compat_app
    from moderation.engine.fixture import build_fixture_model

    torch.set_num_threads(2)
    model_dir = build_fixture_model(tmp_path_factory.mktemp("compat") / "qwen3vl-tiny", seed=1)
    app = create_openai_compat_app(model_dir)
    with serve(app) as url, httpx.Client(base_url=f"{url}/v1", timeout=60) as client:
        yield client, app.state.runner


def _messages(text: str = "Describe the image.") -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _data_url()}},
                {"type": "text", "text": text},
            ],
        },
    ]


def test_models(server: tuple[httpx.Client, Any]) -> None:
    client, runner = server
    data = client.get("/models").json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == [runner.name]
    assert runner.name.startswith("fixture:")


def test_greedy_completion_with_logprobs(server: tuple[httpx.Client, Any]) -> None:
    client, runner = server
    body = {"model": runner.name, "messages": _messages(), "max_tokens": 5, "temperature": 0}
    reply = client.post("/chat/completions", json={**body, "logprobs": True, "top_logprobs": 3}).json()
    choice = reply["choices"][0]
    assert reply["object"] == "chat.completion" and reply["model"] == runner.name
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = reply["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    content = choice["logprobs"]["content"]
    assert len(content) == usage["completion_tokens"] <= 5
    for entry in content:
        tops = entry["top_logprobs"]
        assert len(tops) == 3
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert all(t["logprob"] <= 0 and isinstance(t["token"], str) for t in tops)
        assert entry["logprob"] == pytest.approx(tops[0]["logprob"])  # greedy picks the top token
    # Deterministic, and the same text without logprobs.
    again = client.post("/chat/completions", json=body).json()
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]
    assert again["choices"][0]["logprobs"] is None


def test_full_vocabulary_top_logprobs_sum_to_one(server: tuple[httpx.Client, Any]) -> None:
    client, runner = server
    reply = client.post(
        "/chat/completions",
        json={"messages": _messages(), "max_tokens": 1, "logprobs": True, "top_logprobs": runner.vocab_size},
    ).json()
    tops = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert len(tops) == runner.vocab_size
    assert math.fsum(math.exp(t["logprob"]) for t in tops) == pytest.approx(1.0, abs=1e-4)


def test_continue_final_message_leaves_the_assistant_turn_open(server: tuple[httpx.Client, Any]) -> None:
    import torch

    client, runner = server
    prefix = "Description: a colourful"
    messages = [*_messages(), {"role": "assistant", "content": prefix}]
    reply = client.post(
        "/chat/completions",
        json={
            "messages": messages,
            "continue_final_message": True,
            "add_generation_prompt": False,
            "max_tokens": 1,
            "logprobs": True,
            "top_logprobs": 5,
        },
    ).json()
    plain = client.post("/chat/completions", json={"messages": _messages(), "max_tokens": 1}).json()
    prefix_tokens = len(runner.tokenizer(prefix, add_special_tokens=False)["input_ids"])
    assert reply["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + prefix_tokens

    # The same next-token distribution as the model's forward pass on "<prompt><|im_start|>assistant\n<prefix>".
    from api.openai_compat import _convert_messages

    chat, images = _convert_messages(_messages())
    text = runner.render(chat, add_generation_prompt=True, continue_final=False) + prefix
    inputs = runner.processor(text=[text], images=images, return_tensors="pt")
    with torch.inference_mode():
        logits = runner.model(**inputs).logits[0, -1]
    values, _ = torch.topk(torch.log_softmax(logits.float(), dim=-1), 5)
    got = [t["logprob"] for t in reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]]
    assert got == pytest.approx(values.tolist(), abs=1e-5)


def test_stop_strings(server: tuple[httpx.Client, Any]) -> None:
    client, _ = server
    first = client.post("/chat/completions", json={"messages": _messages(), "max_tokens": 8}).json()
    text = first["choices"][0]["message"]["content"]
    if len(text) < 3:
        pytest.skip("the fixture produced too little text to cut")
    stop = text[2:4]
    reply = client.post(
        "/chat/completions", json={"messages": _messages(), "max_tokens": 8, "stop": [stop]}
    ).json()
    choice = reply["choices"][0]
    assert choice["message"]["content"] == text[: text.find(stop)]
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"messages": []}, 400, "non-empty"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}
                ]
            },
            400,
            "data: image URLs",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "other"}, 404, "does not exist"),
        ({"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True}, 400, "assistant"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 10**9}, 400, "top_logprobs"),
    ],
)
def test_errors_are_openai_shaped(
    server: tuple[httpx.Client, Any], body: dict[str, Any], status: int, fragment: str
) -> None:
    client, _ = server
    response = client.post("/chat/completions", json=body)
    assert response.status_code == status
    assert fragment in response.json()["error"]["message"]


def test_module_entry_point_parses_arguments(tmp_path: Path) -> None:
    from api import openai_compat

    with pytest.raises(SystemExit):
        openai_compat.main(["--help"])
