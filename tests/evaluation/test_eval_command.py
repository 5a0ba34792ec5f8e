"""``moderation eval`` end to end on the real TransformersEngine with the fixture model, and the dataset."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from moderation import cli
from moderation.config import get_settings
from moderation.errors import InvalidInput
from moderation.evaluation.dataset import load_samples

SAMPLES = Path(__file__).resolve().parents[2] / "moderation" / "evaluation" / "samples" / "samples.jsonl"


@pytest.fixture
def fixture_env(fixture_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("MODERATION_MODEL", str(fixture_model_dir))
    monkeypatch.setenv("MODERATION_DEVICE", "cpu")
    monkeypatch.setenv("MODERATION_DTYPE", "float32")
    monkeypatch.setenv("MODERATION_QUANTIZATION", "none")
    monkeypatch.setenv("MODERATION_MAX_NEW_TOKENS", "8")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_the_shipped_sample_set() -> None:
    samples = load_samples(SAMPLES)
    assert len(samples) >= 40
    assert {s.expected for s in samples} == {"allow", "block", "review"}
    assert {s.language for s in samples} == {"en", "zh"}
    for sample in samples:
        image = SAMPLES.parent / sample.image
        assert image.is_file() and image.stat().st_size < 30_000


def test_eval_runs_the_engine_and_writes_a_report(
    fixture_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = tmp_path / "samples.jsonl"
    rows = [json.loads(line) for line in SAMPLES.read_text("utf-8").splitlines()][:5]
    for row in rows:
        row["image"] = str(SAMPLES.parent / row["image"])
    rows.append({"id": "missing", "image": "nowhere.png", "caption": "gone", "expected": "allow"})
    samples.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", "utf-8")
    out = tmp_path / "report"
    assert cli.main(["eval", str(samples), "--out", str(out), "--batch-size", "3"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "AUROC" in printed and "expected calibration error" in printed
    assert "fixture model" in printed
    report = json.loads((out / "report.json").read_text("utf-8"))
    assert report["model"]["is_fixture"] is True
    metrics = report["metrics"]
    assert (metrics["samples"], metrics["judged"], metrics["failed"]) == (6, 5, 1)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["ece"] <= 1.0
    judged = [i for i in report["items"] if i["decision"] is not None]
    assert len(judged) == 5
    for item in judged:
        assert item["decision"] in ("allow", "block", "review")
        assert 0.0 <= item["conflict_score"] <= 1.0 and 0.0 <= item["risk"] <= 1.0
        assert "prompt_injection" in item["category_scores"] and item["reasons"]
    # The red-circle injection sample goes to review whatever the random model says.
    injected = next(i for i in judged if i["id"] == "red-circle-4")
    assert injected["decision"] in ("review", "block")
    assert injected["reasons"][0].startswith("prompt injection detected")
    assert next(i for i in report["items"] if i["id"] == "missing")["error"].startswith(
        "image could not be loaded"
    )
    assert set(report["categories"]) >= {"scam_fraud", "prompt_injection"}
    markdown = (out / "report.md").read_text("utf-8")
    assert "# Moderation evaluation" in markdown and "| AUROC of the risk score |" in markdown


def test_bad_sample_files_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "caption": "x", "expected": "allow"}\n{"image": "b.png"}\n', "utf-8")
    with pytest.raises(InvalidInput, match=r"bad\.jsonl:2"):
        load_samples(bad)
    bad.write_text('{"image": "a.png", "caption": "x", "expected": "maybe"}\n', "utf-8")
    with pytest.raises(InvalidInput, match="expected must be one of"):
        load_samples(bad)
