"""Pure helpers shared by every engine backend: yes/no spellings, confidence, language, parsing the lines.

No torch here, so a backend that talks to a remote server does not load it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from moderation.engine import prompts
from moderation.engine.base import EngineRequest
from moderation.engine.images import detect_language

YES_VARIANTS = (" yes", "yes", " Yes", "Yes", " YES", "YES")
NO_VARIANTS = (" no", "no", " No", "No", " NO", "NO")

MAX_DESCRIPTION_CHARS = 600
MAX_VISIBLE_TEXT_CHARS = 500
MAX_EXPLANATION_CHARS = 400

_SPECIAL_TEXT_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>|</?(?:think|tool_call|tool_response)>")
_NONE_VISIBLE = {
    "none",
    "none.",
    "n/a",
    "no text",
    "no visible text",
    "无",
    "无。",
    "没有",
    "(none)",
    "“无”",
    '"none"',
}


def binary_entropy(p: float) -> float:
    """Binary entropy of ``p`` in nats (0 at p=0 or 1, ln 2 at p=0.5)."""
    p = min(max(p, 0.0), 1.0)
    if p in (0.0, 1.0):
        return 0.0
    return -(p * math.log(p) + (1.0 - p) * math.log(1.0 - p))


def confidence_from(conflict_score: float, mass: float) -> float:
    """Confidence = yes/no mass at the conflict position x (1 - H(score) / ln 2), clamped to [0, 1]."""
    value = min(max(mass, 0.0), 1.0) * (1.0 - binary_entropy(conflict_score) / math.log(2.0))
    return min(max(value, 0.0), 1.0)


def _clean(text: str) -> str:
    # NUL: Postgres text columns refuse it, and a verdict that cannot be stored fails its whole batch.
    text = _SPECIAL_TEXT_RE.sub(" ", text.replace("\ufffd", "").replace("\x00", ""))
    return re.sub(r"\s+", " ", text).strip().strip("*").strip()


def _cap(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip() + "…"


def _line_label(names: Iterable[str]) -> str:
    """A pattern for one of ``names`` opening a line (markdown allowed around it) and followed by a colon."""
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return rf"(?m)^[ \t>*#_-]*({alternatives})[ \t*_]*[:：]"


def _label_regex() -> tuple[re.Pattern[str], dict[str, str]]:
    by_label: dict[str, str] = {}
    for field, names in prompts.all_labels().items():
        for name in names:
            by_label[name.lower()] = field
    return re.compile(_line_label(by_label), re.IGNORECASE), by_label


_LABEL_RE, _LABEL_FIELDS = _label_regex()
_ANSWER_BLOCK_RE = re.compile(_line_label([prompts.CONFLICT_KEY]), re.IGNORECASE)


def parse_description(
    text: str, language: str, conflict_score: float, category_scores: dict[str, float]
) -> tuple[str, str, str]:
    """Split generated text into (description, visible text, explanation); never fails."""
    raw = _SPECIAL_TEXT_RE.sub(" ", text or "")
    # Text the model wrote in the shape of the scored answers ("conflict: no", then a line per category) is
    # not part of its explanation: it would read as a verdict that may contradict the scored one.
    answers = _ANSWER_BLOCK_RE.search(raw)
    if answers is not None:
        raw = raw[: answers.start()]
    fields: dict[str, str] = {}
    matches = list(_LABEL_RE.finditer(raw))
    if matches:
        preamble = raw[: matches[0].start()]
        for i, match in enumerate(matches):
            end = matches[i + 1].start() if i + 1 < len(matches) else len(raw)
            field = _LABEL_FIELDS[match.group(1).lower()]
            fields.setdefault(field, raw[match.end() : end])
        if "description" not in fields and _clean(preamble):
            fields["description"] = preamble
    else:
        fields["description"] = raw
    description = _cap(_clean(fields.get("description", "")), MAX_DESCRIPTION_CHARS)
    visible = _clean(fields.get("visible_text", ""))
    if visible.lower() in _NONE_VISIBLE:
        visible = ""
    visible = _cap(visible, MAX_VISIBLE_TEXT_CHARS)
    explanation = _cap(_clean(fields.get("explanation", "")), MAX_EXPLANATION_CHARS)
    if not explanation:
        explanation = prompts.fallback_explanation(conflict_score, category_scores, language)
    return description, visible, explanation


def request_language(request: EngineRequest) -> str:
    """Prompt language: Chinese when the request says so or the caption contains CJK, else English."""
    if (request.language or "").lower().startswith("zh"):
        return "zh"
    return detect_language(request.caption)


# Tokens generation must never emit: a stray vision placeholder would desynchronise M-RoPE.
SUPPRESSED_TOKENS = (
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
)


def suppressed_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the vision placeholder tokens this tokenizer knows."""
    ids = (tokenizer.convert_tokens_to_ids(t) for t in SUPPRESSED_TOKENS)
    return [tid for tid in ids if isinstance(tid, int) and tid != tokenizer.unk_token_id]


def eos_token_ids(tokenizer: Any, generation_config: Any) -> list[int]:
    """Every id that ends a reply: the checkpoint's, the chat template's and the tokenizer's own."""
    ids: list[int] = []
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.append(configured)
    elif configured:
        ids.extend(int(i) for i in configured)
    for token in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid not in ids and tid != tokenizer.unk_token_id:
            ids.append(tid)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


_BLANK_LINE_RE = re.compile(r"\n[ \t\r]*\n")
_DECORATION_CHARS = frozenset("*#_->` \t")
_LINE_START_RE = re.compile(r"^[ \t\r]*\n")
# The explanation label as the engine's own decoding recognises it: exact case, bold closing after the colon.
_LABEL_LINE_RE = re.compile(_line_label(prompts.all_labels()["explanation"]) + "[*_]*")


@dataclass(frozen=True)
class ReplyEndTokens:
    """Token ids the end of a reply is recognised by (see ``decoder.ReplyEnd``)."""

    blank_line: list[int]  # tokens that hold a blank line
    line_end: list[int]  # tokens that end a line
    line_start: list[int]  # tokens that start with a line break (after one that ends a line: a blank line)
    labels: list[int]  # the explanation label's token, in both languages, with or without a space
    decorations: list[int]  # markdown around a label: "**", "-", "#", ...
    colons: list[int]  # tokens that start with a colon (":", "：", ":**", ":\n\n")


def reply_end_tokens(tokenizer: Any) -> ReplyEndTokens:
    """The tokens that end a reply's labelled lines, found in the tokenizer's vocabulary.

    A reply is over at the first blank line after its explanation line: the engine then forces its own
    answer block, so nothing the model writes after that is needed.
    """
    raw_tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    blank: list[int] = []
    line_end: list[int] = []
    line_start: list[int] = []
    decorations: list[int] = []
    colons: list[int] = []
    for token_id, raw in enumerate(raw_tokens):
        if not raw:
            continue
        text = str(tokenizer.convert_tokens_to_string([raw]))  # byte-level pieces read as UTF-8
        if "\n" in text:
            if _BLANK_LINE_RE.search(text):
                blank.append(token_id)
            if text.rstrip(" \t\r").endswith("\n"):
                line_end.append(token_id)
            if _LINE_START_RE.match(text):
                line_start.append(token_id)
        elif text and set(text) <= _DECORATION_CHARS:  # markdown or spaces around a label
            decorations.append(token_id)
        if text.lstrip("*_ \t")[:1] in (":", "："):
            colons.append(token_id)
    labels: list[int] = []
    for label in prompts.all_labels()["explanation"]:
        for spelled in (label, " " + label):
            ids = tokenizer.encode(spelled, add_special_tokens=False)
            if len(ids) == 1 and ids[0] not in labels:
                labels.append(int(ids[0]))
    return ReplyEndTokens(blank, line_end, line_start, labels, decorations, colons)


def cut_reply(text: str) -> str:
    """A reply cut where the engine's own decoding ends one: at the blank line after its explanation line.

    The remote backend gets the whole completion back; cutting it the same way keeps both backends scoring
    the same text.
    """
    label = _LABEL_LINE_RE.search(text)
    if label is None:
        return text
    content = re.search(r"\S", text[label.end() :])
    if content is None:
        return text
    blank = _BLANK_LINE_RE.search(text, label.end() + content.start())
    return text[: blank.start()].rstrip() if blank else text
