"""A small OpenAI-compatible chat-completions server for a local Qwen3-VL folder (CPU, float32).

It exists so the ``openai`` engine backend can be tested over real HTTP, and tried without a GPU, against
the offline fixture model. It is not a production inference server (use vLLM or SGLang for that): one
request runs at a time, there is no batching and no KV-cache reuse between requests.

Supported, in the OpenAI wire format:

* ``GET /v1/models``;
* ``POST /v1/chat/completions`` with ``messages`` (system / user / assistant; content as a string or as
  ``text`` and ``image_url`` parts, images only as ``data:`` URLs), greedy decoding (``temperature`` is
  accepted and ignored: decoding is always greedy), ``max_tokens`` (or ``max_completion_tokens``),
  ``stop``, ``logprobs`` / ``top_logprobs`` (``choices[0].logprobs.content[i].top_logprobs[j]``, raw
  log-probabilities of the full-vocabulary softmax), and the vLLM / SGLang extension fields
  ``continue_final_message`` / ``add_generation_prompt`` (the final assistant message is left open and
  the model continues it).

``return_tokens_as_token_ids`` (vLLM) names tokens ``"token_id:<id>"`` in the logprobs.
``top_logprobs`` may go up to the whole vocabulary here (vLLM caps it at ``--max-logprobs``, 20 by
default), which lets tests on the random fixture model see the yes/no tokens however unlikely they are.

Run it: ``python -m api.openai_compat --model PATH --port 8001``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import math
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_TOKENS = 256
OPENAI_MAX_TOP_LOGPROBS = 20

# Tokens the server never emits: a stray vision placeholder in the text would break the next request.


class CompatError(Exception):
    """A request the server rejects; rendered as an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _error(message: str, status: int, code: str) -> Response:
    return _json({"error": {"message": message, "type": code, "code": code, "param": None}}, status)


def _decode_data_url(url: str) -> Image.Image:
    if not url.startswith("data:"):
        raise CompatError("only data: image URLs are supported by this server")
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise CompatError("image data URL must be base64-encoded")
    try:
        raw = base64.b64decode(payload, validate=True)
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as exc:
        raise CompatError(f"undecodable image data URL: {exc}") from exc
    return img.convert("RGB")


def _convert_messages(messages: Any) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """OpenAI messages -> the processor's chat format (content lists) and the images in order."""
    if not isinstance(messages, list) or not messages:
        raise CompatError("messages must be a non-empty list")
    chat: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise CompatError("each message needs a role of system, user or assistant")
        content = message.get("content")
        parts: list[dict[str, Any]] = []
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
        elif isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                elif kind == "image_url":
                    image_url = part.get("image_url")
                    url = image_url.get("url") if isinstance(image_url, dict) else image_url
                    if not isinstance(url, str):
                        raise CompatError("image_url part needs a url")
                    images.append(_decode_data_url(url))
                    parts.append({"type": "image"})
                else:
                    raise CompatError(f"unsupported content part type {kind!r}")
        elif content is not None:
            raise CompatError("message content must be a string or a list of parts")
        chat.append({"role": message["role"], "content": parts})
    return chat, images


class QwenRunner:
    """The loaded model and processor; one inference at a time."""

    def __init__(self, model_dir: str | Path, *, served_model_name: str | None = None) -> None:
        import torch
        from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

        from moderation.engine.fixture import CHAT_TEMPLATE_PATH, is_fixture_folder
        from moderation.engine.scoring import eos_token_ids, suppressed_token_ids

        path = Path(model_dir).expanduser().resolve()
        self.is_fixture = is_fixture_folder(path)
        self.name = served_model_name or (f"fixture:{path.name}" if self.is_fixture else path.name)
        self.created = int(time.time())
        self._torch = torch
        model: Any = Qwen3VLForConditionalGeneration.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
        )
        self.model = model.to("cpu").eval()
        self.processor: Any = Qwen3VLProcessor.from_pretrained(str(path), local_files_only=True)
        if not getattr(self.processor, "chat_template", None):
            self.processor.chat_template = CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
        self.tokenizer: Any = self.processor.tokenizer
        self.vocab_size = int(self.model.config.text_config.vocab_size)
        self.suppress_ids = suppressed_token_ids(self.tokenizer)
        self.eos_ids = eos_token_ids(self.tokenizer, self.model.generation_config)
        self._token_text: dict[int, str] = {}
        self.lock = threading.Lock()

    # -- helpers -----------------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        """The text of one token (as OpenAI's ``logprobs.content[].token``), cached."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if token_id < len(self.tokenizer) else ""
            self._token_text[token_id] = text
        return text

    def _label(self, token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else self.token_text(token_id)

    def render(self, chat: list[dict[str, Any]], *, add_generation_prompt: bool, continue_final: bool) -> str:
        """The chat rendered by the model's template (the final assistant message left open if asked)."""
        if continue_final:
            if chat[-1]["role"] != "assistant":
                raise CompatError("continue_final_message needs an assistant message last")
            if add_generation_prompt:
                raise CompatError("continue_final_message and add_generation_prompt are mutually exclusive")
        text = self.processor.apply_chat_template(
            chat,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final,
        )
        return text if isinstance(text, str) else text[0]

    def _logprob_entry(self, log_probs: Any, token_id: int, top: int, as_ids: bool) -> dict[str, Any]:
        text = self.token_text(token_id)
        entry: dict[str, Any] = {
            "token": self._label(token_id, as_ids),
            "logprob": float(log_probs[token_id]),
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [],
        }
        if top:
            values, ids = self._torch.topk(log_probs, min(top, log_probs.shape[-1]))
            # Beyond OpenAI's limit of 20 the byte lists are left out (null): they would triple the reply.
            with_bytes = top <= OPENAI_MAX_TOP_LOGPROBS
            entry["top_logprobs"] = [
                {
                    "token": self._label(i, as_ids),
                    "logprob": v,
                    "bytes": list(self.token_text(i).encode("utf-8")) if with_bytes else None,
                }
                for v, i in zip(values.tolist(), ids.tolist(), strict=True)
            ]
        return entry

    # -- inference ---------------------------------------------------------------------------------

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """One chat completion (greedy) in the OpenAI response format."""
        torch = self._torch
        if int(body.get("n") or 1) != 1:
            raise CompatError("only n=1 is supported")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise CompatError("max_tokens must be a positive integer")
        stop = body.get("stop") or []
        stops = [stop] if isinstance(stop, str) else [str(s) for s in stop]
        want_logprobs = bool(body.get("logprobs"))
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        top = int(body.get("top_logprobs") or 0)
        if top < 0 or top > self.vocab_size:
            raise CompatError(f"top_logprobs must lie in [0, {self.vocab_size}]")
        continue_final = bool(body.get("continue_final_message", False))
        add_generation_prompt = bool(body.get("add_generation_prompt", not continue_final))
        chat, images = _convert_messages(body.get("messages"))
        text = self.render(chat, add_generation_prompt=add_generation_prompt, continue_final=continue_final)
        inputs = self.processor(text=[text], images=images or None, return_tensors="pt")
        prompt_tokens = int(inputs["input_ids"].shape[1])

        with self.lock, torch.inference_mode():
            generated, step_logits = self._greedy(inputs, max_tokens, stops)

        finish = "length"
        ids = generated
        if generated and generated[-1] in self.eos_ids:
            finish, ids = "stop", generated[:-1]
        content = self.tokenizer.decode(ids, skip_special_tokens=True)
        for s in stops:
            cut = content.find(s)
            if cut >= 0:
                content, finish = content[:cut], "stop"
        logprobs = None
        if want_logprobs:
            logprobs = {
                "content": [
                    self._logprob_entry(torch.log_softmax(logits.float(), dim=-1), tid, top, as_ids)
                    for tid, logits in zip(generated, step_logits, strict=True)
                ]
            }
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(generated),
                "total_tokens": prompt_tokens + len(generated),
            },
        }

    def _greedy(self, inputs: Any, max_tokens: int, stops: list[str]) -> tuple[list[int], list[Any]]:
        """Greedy token ids (ending with the EOS token if one was produced) and the raw logits of each step."""
        if max_tokens == 1:
            logits = self.model(**inputs, logits_to_keep=1).logits[0, -1]
            chosen = logits.clone()
            chosen[self.suppress_ids] = -math.inf
            return [int(chosen.argmax())], [logits]
        from transformers import StoppingCriteria, StoppingCriteriaList

        torch = self._torch
        tokenizer = self.tokenizer
        prompt_len = int(inputs["input_ids"].shape[1])

        class _StopStrings(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                text = tokenizer.decode(input_ids[0, prompt_len:], skip_special_tokens=True)
                done = any(s in text for s in stops)
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool)

        out = self.model.generate(
            **inputs,
            max_new_tokens=max_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id or self.eos_ids[0],
            suppress_tokens=self.suppress_ids or None,
            stopping_criteria=StoppingCriteriaList([_StopStrings()]) if stops else None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        generated = [int(t) for t in out.sequences[0, prompt_len:].tolist()]
        return generated, [step[0] for step in out.logits][: len(generated)]


def create_openai_compat_app(model_dir: str | Path, *, served_model_name: str | None = None) -> FastAPI:
    """The OpenAI-compatible app serving the Qwen3-VL folder ``model_dir`` (loaded now, on the CPU)."""
    runner = QwenRunner(model_dir, served_model_name=served_model_name)
    app = FastAPI(title="moderation OpenAI-compatible test server", docs_url=None, redoc_url=None)
    app.state.runner = runner

    @app.get("/v1/models")
    def list_models() -> Response:
        return _json(
            {
                "object": "list",
                "data": [
                    {
                        "id": runner.name,
                        "object": "model",
                        "created": runner.created,
                        "owned_by": "moderation",
                        "max_model_len": int(runner.model.config.text_config.max_position_embeddings),
                    }
                ],
            }
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error("request body is not valid JSON", 400, "invalid_request_error")
        if not isinstance(body, dict):
            return _error("request body must be a JSON object", 400, "invalid_request_error")
        if body.get("stream"):
            return _error("stream is not supported", 400, "invalid_request_error")
        model = body.get("model")
        if model is not None and model != runner.name:
            return _error(f"the model `{model}` does not exist", 404, "model_not_found")
        try:
            from starlette.concurrency import run_in_threadpool

            result = await run_in_threadpool(runner.complete, body)
        except CompatError as exc:
            return _error(exc.message, exc.status, exc.code)
        return _json(result)

    return app


def main(argv: list[str] | None = None) -> None:
    """``python -m api.openai_compat --model PATH --port N``."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", required=True, help="local Qwen3-VL model folder (e.g. the fixture)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--served-model-name", default=None, help="model id to serve (default: folder name)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    app = create_openai_compat_app(args.model, served_model_name=args.served_model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
