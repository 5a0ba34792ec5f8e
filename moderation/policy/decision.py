"""The policy decision around the engine: known images, blocklists, prompt injection and thresholds.

Order: a known image blocks at once; then a blocklisted caption blocks at once (neither runs the engine);
after the engine, a blocklisted visible text blocks; then a detected prompt injection sends an item that
would be allowed to review; then the tenant's thresholds decide (see ``routing``). Every step that
changes the decision adds a reason that names what it found.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from moderation.engine.base import EngineResult
from moderation.engine.images import detect_language
from moderation.policy.blocklist import Blocklist, BlocklistHit, split_timeouts
from moderation.policy.injection import KINDS, InjectionResult, detect_injection
from moderation.policy.routing import Thresholds, route
from moderation.submissions.models import Decision

#: Model fields of a verdict reached by policy alone, without running the engine.
POLICY_MODEL_NAME = "policy"
POLICY_RULES_VERSION = "policy-rules-v1"
INJECTION_CATEGORY = "prompt_injection"


@dataclass(frozen=True)
class KnownImageMatch:
    """A submission's image is a near-duplicate of one of the tenant's known images."""

    known_image_id: uuid.UUID
    label: str
    source_submission_id: uuid.UUID | None
    phash_distance: int
    dhash_distance: int

    @property
    def reason(self) -> str:
        """One line naming the matched known image and how close it is."""
        return (
            f"known image: near-duplicate of '{self.label}' (known image {self.known_image_id}; "
            f"pHash distance {self.phash_distance}/64, dHash distance {self.dhash_distance}/64)"
        )


@dataclass(frozen=True)
class PolicyVerdict:
    """A verdict reached before the engine: always a block, with its explanation."""

    decision: Decision
    reasons: list[str]
    description: str
    explanation: str


@dataclass(frozen=True)
class EngineVerdict:
    """The decision after the engine, with the combined category scores and the explanation to store."""

    decision: Decision
    reasons: list[str]
    category_scores: dict[str, float]
    explanation: str
    injection: InjectionResult = field(default_factory=lambda: InjectionResult(0.0))


def _quote(text: str, language: str) -> str:
    return f"“{text}”" if language == "zh" else f"'{text}'"


def before_engine(
    caption: str, known: KnownImageMatch | None, caption_hits: list[BlocklistHit]
) -> PolicyVerdict | None:
    """Block at once on a known image or a blocklisted caption; None when the engine must judge."""
    zh = detect_language(caption) == "zh"
    if known is not None:
        label = _quote(known.label, "zh" if zh else "en")
        distances = f"pHash {known.phash_distance}/64, dHash {known.dhash_distance}/64"
        return PolicyVerdict(
            decision=Decision.block,
            reasons=[known.reason, *(hit.reason for hit in caption_hits)],
            description=(
                f"图片与已知图片{label}近乎相同，未运行模型即被拦截。"
                if zh
                else f"Not described: the image is a near-duplicate of the known image {label}, "
                "so it was blocked without running the model."
            ),
            explanation=(
                f"已拦截：该图片与已知图片{label}匹配（{distances}）。"
                if zh
                else f"Blocked: the image matches the known image {label} ({distances})."
            ),
        )
    caption_hits, unchecked = split_timeouts(caption_hits)
    if unchecked and not caption_hits:
        # Text that stalls a pattern may be crafted to: it is not passed as clean, a person looks at it.
        return PolicyVerdict(
            decision=Decision.review,
            reasons=[hit.reason for hit in unchecked],
            description=(
                "配文未能及时通过屏蔽词表检查，未运行模型即交人工审核。"
                if zh
                else "Not described: the caption could not be checked against the blocklist in time, so it "
                "was sent to review without running the model."
            ),
            explanation=(
                "待人工审核：配文未能及时通过屏蔽词表的检查。"
                if zh
                else "Sent to review: the caption could not be checked against the blocklist in time."
            ),
        )
    if caption_hits:
        entries = ", ".join(_quote(hit.entry, "zh" if zh else "en") for hit in caption_hits)
        return PolicyVerdict(
            decision=Decision.block,
            reasons=[hit.reason for hit in caption_hits],
            description=(
                "配文命中屏蔽词表，未运行模型即被拦截。"
                if zh
                else "Not described: the caption matched the blocklist, so it was blocked without running the model."
            ),
            explanation=(
                f"已拦截：配文包含屏蔽词 {entries}。"
                if zh
                else f"Blocked: the caption contains blocklisted {_entries_noun(caption_hits)} {entries}."
            ),
        )
    return None


def _entries_noun(hits: list[BlocklistHit]) -> str:
    kinds = {hit.kind for hit in hits}
    if kinds == {"term"}:
        return "term" if len(hits) == 1 else "terms"
    if kinds == {"pattern"}:
        return "pattern" if len(hits) == 1 else "patterns"
    return "entries"


def after_engine(
    caption: str, result: EngineResult, blocklist: Blocklist, thresholds: Thresholds
) -> EngineVerdict:
    """Decide from the engine's result: visible-text blocklist, then prompt injection, then thresholds."""
    zh = detect_language(caption) == "zh"
    visible_hits, unchecked = split_timeouts(blocklist.match(result.visible_text, "visible text"))
    injection = detect_injection(caption, result.visible_text)
    scores = dict(result.category_scores)
    if injection.fired:
        scores[INJECTION_CATEGORY] = max(scores.get(INJECTION_CATEGORY, 0.0), injection.score)
    # Thresholds see the model's own scores: a rule-detected injection goes to review, it does not block.
    routing = route(result.conflict_score, result.confidence, result.category_scores, thresholds)
    decision = routing.decision
    reasons: list[str] = []
    notes: list[str] = []
    if visible_hits:
        decision = Decision.block
        reasons += [hit.reason for hit in visible_hits]
        entries = ", ".join(_quote(hit.entry, "zh" if zh else "en") for hit in visible_hits)
        notes.append(
            f"已拦截：图中文字包含屏蔽词 {entries}。"
            if zh
            else f"Blocked: the text visible in the image contains blocklisted "
            f"{_entries_noun(visible_hits)} {entries}."
        )
    if unchecked and decision != Decision.block:
        decision = Decision.review
        reasons += [hit.reason for hit in unchecked]
        notes.append(
            "待人工审核：图中文字未能及时通过屏蔽词表的检查。"
            if zh
            else "Sent to review: the text visible in the image could not be checked against the blocklist in time."
        )
    if injection.fired:
        reasons.append(injection.reason)
        if decision == Decision.allow:
            decision = Decision.review
            reasons.append("prompt injection: sent to review instead of allowing")
        kinds = "; ".join(f'{KINDS[f.kind]} in {f.where}: "{f.evidence}"' for f in injection.findings)
        notes.append(
            f"配文或图中文字试图操控审核系统（{kinds}）。"
            if zh
            else f"The caption or image text tries to instruct the moderation system ({kinds})."
        )
    reasons += routing.reasons
    explanation = " ".join([*notes, result.explanation]).strip() if notes else result.explanation
    return EngineVerdict(
        decision=decision,
        reasons=reasons,
        category_scores=scores,
        explanation=explanation,
        injection=injection,
    )
