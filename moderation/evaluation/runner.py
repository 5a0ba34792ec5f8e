"""Running the engine on labelled samples and measuring how well the verdicts match the labels."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moderation.config import Settings
from moderation.db import utcnow
from moderation.engine.base import EngineRequest, ModerationEngine
from moderation.engine.prompts import DEFAULT_CATEGORIES
from moderation.evaluation.dataset import Sample, load_image
from moderation.evaluation.metrics import (
    accuracy,
    auroc,
    brier_score,
    expected_calibration_error,
    precision_recall,
    reliability_bins,
)
from moderation.policy.blocklist import Blocklist
from moderation.policy.decision import after_engine
from moderation.policy.routing import Thresholds

logger = logging.getLogger(__name__)


@dataclass
class ItemResult:
    """The verdict on one sample next to its label."""

    id: str
    caption: str
    expected: str
    expected_categories: list[str]
    decision: str | None = None
    conflict_score: float | None = None
    confidence: float | None = None
    risk: float | None = None
    category_scores: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    description: str = ""
    visible_text: str = ""
    explanation: str = ""
    error: str | None = None


@dataclass
class EvaluationReport:
    """Everything ``moderation eval`` measured, ready to be written as JSON and Markdown."""

    model: dict[str, Any]
    samples_file: str
    created_at: str
    thresholds: dict[str, float]
    metrics: dict[str, Any]
    categories: dict[str, dict[str, Any]]
    reliability: list[dict[str, Any]]
    confusion: dict[str, dict[str, int]]
    items: list[ItemResult]


def risk_score(conflict_score: float, category_scores: dict[str, float]) -> float:
    """The probability-like score that the item should not be allowed: the largest of all scores."""
    return max([conflict_score, *category_scores.values()])


def run_evaluation(
    engine: ModerationEngine,
    samples: list[Sample],
    *,
    base_dir: Path,
    settings: Settings,
    thresholds: Thresholds,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[ItemResult]:
    """Judge every sample in batches with the same policy decision as the service (without tenant lists)."""
    items: list[ItemResult] = []
    batch_size = max(1, batch_size)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        ready: list[tuple[ItemResult, EngineRequest]] = []
        for sample in chunk:
            item = ItemResult(sample.id, sample.caption, sample.expected, list(sample.categories))
            items.append(item)
            try:
                image = load_image(sample, base_dir, settings)
            except Exception as exc:
                logger.warning("sample %s: image could not be loaded: %s", sample.id, exc)
                item.error = f"image could not be loaded: {exc}"
                continue
            ready.append(
                (item, EngineRequest(image=image, caption=sample.caption, categories=DEFAULT_CATEGORIES))
            )
        if ready:
            results = engine.moderate([request for _, request in ready])
            for (item, _), result in zip(ready, results, strict=True):
                outcome = after_engine(item.caption, result, Blocklist(), thresholds)
                item.decision = str(outcome.decision)
                item.conflict_score = result.conflict_score
                item.confidence = result.confidence
                item.category_scores = dict(outcome.category_scores)
                item.risk = risk_score(result.conflict_score, outcome.category_scores)
                item.reasons = outcome.reasons
                item.description = result.description
                item.visible_text = result.visible_text
                item.explanation = outcome.explanation
        if progress is not None:
            progress(min(start + batch_size, len(samples)), len(samples))
    return items


def summarize(
    items: list[ItemResult],
    *,
    engine: ModerationEngine,
    samples_file: str,
    thresholds: Thresholds,
    bins: int = 10,
) -> EvaluationReport:
    """Accuracy, AUROC, ECE, Brier score, review rate, per-category precision/recall and a confusion matrix."""
    judged = [i for i in items if i.decision is not None and i.risk is not None]
    expected = [i.expected for i in judged]
    predicted = [i.decision or "" for i in judged]
    # Binary view: "should not simply be allowed" (block or review) against the risk score.
    labels = [i.expected != "allow" for i in judged]
    risks = [float(i.risk or 0.0) for i in judged]
    automatic = [i for i in judged if i.decision != "review"]
    metrics: dict[str, Any] = {
        "samples": len(items),
        "judged": len(judged),
        "failed": len(items) - len(judged),
        "accuracy": accuracy(expected, predicted),
        "automatic_accuracy": accuracy(
            [i.expected for i in automatic], [i.decision or "" for i in automatic]
        ),
        "review_rate": (len(judged) - len(automatic)) / len(judged) if judged else None,
        "binary_accuracy_at_0_5": accuracy([str(x) for x in labels], [str(r >= 0.5) for r in risks]),
        "auroc": auroc(labels, risks),
        "ece": expected_calibration_error(labels, risks, bins) if judged else None,
        "brier": brier_score(labels, risks) if judged else None,
        "conflict_auroc": auroc(labels, [float(i.conflict_score or 0.0) for i in judged]),
    }
    names = [c.name for c in DEFAULT_CATEGORIES]
    names += sorted({c for i in judged for c in i.expected_categories if c not in names})
    categories: dict[str, dict[str, Any]] = {}
    for name in names:
        pr = precision_recall(
            [name in i.expected_categories for i in judged],
            [i.category_scores.get(name, 0.0) >= thresholds.category_review_threshold for i in judged],
        )
        categories[name] = asdict(pr)
        categories[name]["auroc"] = auroc(
            [name in i.expected_categories for i in judged],
            [i.category_scores.get(name, 0.0) for i in judged],
        )
    confusion = {e: {p: 0 for p in ("allow", "block", "review")} for e in ("allow", "block", "review")}
    for i in judged:
        confusion[i.expected][i.decision or "review"] += 1
    info = engine.info
    return EvaluationReport(
        model={
            "name": info.name,
            "revision": info.revision,
            "prompt_version": info.prompt_version,
            "is_fixture": info.is_fixture,
        },
        samples_file=samples_file,
        created_at=utcnow().isoformat(),
        thresholds=asdict(thresholds),
        metrics=metrics,
        categories=categories,
        reliability=[asdict(b) for b in reliability_bins(labels, risks, bins)] if judged else [],
        confusion=confusion,
        items=items,
    )


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def summary_lines(report: EvaluationReport) -> list[str]:
    """The headline numbers, one per line, for the terminal."""
    m = report.metrics
    lines = [
        f"model: {report.model['name']} ({report.model['revision']}, {report.model['prompt_version']})",
        f"samples: {m['samples']} judged, {m['failed']} failed to load"
        if m["failed"]
        else f"samples: {m['samples']}",
        f"accuracy (decision = expected): {_fmt(m['accuracy'])}",
        f"accuracy of automatic decisions: {_fmt(m['automatic_accuracy'])}  review rate: {_fmt(m['review_rate'])}",
        f"AUROC (risk score vs. not-allow): {_fmt(m['auroc'])}  conflict-score AUROC: {_fmt(m['conflict_auroc'])}",
        f"expected calibration error: {_fmt(m['ece'])}  Brier score: {_fmt(m['brier'])}",
        "per category (precision / recall, support):",
    ]
    for name, c in report.categories.items():
        if c["support"] or c["false_positives"]:
            lines.append(f"  {name}: {_fmt(c['precision'])} / {_fmt(c['recall'])} ({c['support']})")
    if report.model.get("is_fixture"):
        lines.append("NOTE: fixture model (random weights) - these numbers are meaningless")
    return lines


def markdown(report: EvaluationReport) -> str:
    """The report as Markdown."""
    m = report.metrics
    out = [
        "# Moderation evaluation",
        "",
        f"- Model: `{report.model['name']}` revision `{report.model['revision']}`, prompt "
        f"`{report.model['prompt_version']}`"
        + (" — **fixture model, numbers are meaningless**" if report.model.get("is_fixture") else ""),
        f"- Samples: `{report.samples_file}` ({m['samples']} items, {m['failed']} failed to load)",
        f"- Created: {report.created_at}",
        "- Thresholds: " + ", ".join(f"{k} {v}" for k, v in report.thresholds.items()),
        "",
        "## Summary",
        "",
        "| Metric | Value |",
        "| --- | --- |",
        f"| Accuracy (decision equals the label) | {_fmt(m['accuracy'])} |",
        f"| Accuracy of automatic (non-review) decisions | {_fmt(m['automatic_accuracy'])} |",
        f"| Review rate | {_fmt(m['review_rate'])} |",
        f"| Binary accuracy (risk >= 0.5 vs. not-allow) | {_fmt(m['binary_accuracy_at_0_5'])} |",
        f"| AUROC of the risk score | {_fmt(m['auroc'])} |",
        f"| AUROC of the conflict score | {_fmt(m['conflict_auroc'])} |",
        f"| Expected calibration error (10 bins) | {_fmt(m['ece'])} |",
        f"| Brier score | {_fmt(m['brier'])} |",
        "",
        "The risk score is the largest of the conflict score and the category scores; the binary label is",
        '"the expected decision is not allow".',
        "",
        "## Confusion (rows: expected, columns: decided)",
        "",
        "| expected \\ decided | allow | block | review |",
        "| --- | --- | --- | --- |",
    ]
    for expected, row in report.confusion.items():
        out.append(f"| {expected} | {row['allow']} | {row['block']} | {row['review']} |")
    out += [
        "",
        "## Categories",
        "",
        "| Category | Precision | Recall | F1 | AUROC | Support | FP |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in report.categories.items():
        out.append(
            f"| {name} | {_fmt(c['precision'])} | {_fmt(c['recall'])} | {_fmt(c['f1'])} | {_fmt(c['auroc'])} "
            f"| {c['support']} | {c['false_positives']} |"
        )
    out += [
        "",
        "## Reliability (risk score)",
        "",
        "| Bin | Count | Mean score | Observed rate |",
        "| --- | --- | --- | --- |",
    ]
    for b in report.reliability:
        out.append(
            f"| {b['lower']:.1f}–{b['upper']:.1f} | {b['count']} | {_fmt(b['mean_probability'])} "
            f"| {_fmt(b['observed_rate'])} |"
        )
    wrong = [i for i in report.items if i.error or i.decision != i.expected]
    out += ["", f"## Items not decided as expected ({len(wrong)})", ""]
    if wrong:
        out += [
            "| Id | Expected | Decided | Conflict | Risk | Caption | Reasons |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for i in wrong:
            caption = i.caption.replace("|", "\\|").replace("\n", " ")[:80]
            reasons = (i.error or "; ".join(i.reasons)).replace("|", "\\|")[:160]
            out.append(
                f"| {i.id} | {i.expected} | {i.decision or 'error'} | {_fmt(i.conflict_score)} | {_fmt(i.risk)} "
                f"| {caption} | {reasons} |"
            )
    return "\n".join(out) + "\n"


def write_report(report: EvaluationReport, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    md_path = out_dir / "report.md"
    json_path.write_text(json.dumps(asdict(report), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown(report), encoding="utf-8")
    return json_path, md_path
