"""Blocklists: terms and patterns on normalised text, and the safety checks on patterns."""

from __future__ import annotations

import pytest

from moderation.errors import InvalidInput
from moderation.policy.blocklist import (
    Blocklist,
    BlocklistLimits,
    structural_problem,
    validate_blocklist,
    validate_pattern,
)

LIMITS = BlocklistLimits()
BLOCKLIST = Blocklist.from_policy(
    {
        "blocklist": {
            "terms": ["free money", "crypto giveaway", "加微信", "代开发票"],
            "patterns": [r"1[3-9]\d{9}", r"v\s*x\s*[:：]\s*\w+", r"\bwa\.me/\d+"],
        }
    }
)


@pytest.mark.parametrize(
    ("text", "entry"),
    [
        ("ＦＲＥＥ　ＭＯＮＥＹ for everyone", "free money"),
        ("Free\u200b money!!!", "free money"),
        ("f.r.e.e m-o-n-e-y", "free money"),
        ("Huge CRYPTO   GIVEAWAY today", "crypto giveaway"),
        ("想要的加 微 信", "加微信"),
        ("代\u200b开\u200b发\u200b票，正规", "代开发票"),
        ("call me 138 0013 8000", r"1[3-9]\d{9}"),
        ("ＶＸ：ｂｏｓｓ８８", r"v\s*x\s*[:：]\s*\w+"),
        ("chat at wa.me/441234", r"\bwa\.me/\d+"),
    ],
)
def test_hits_after_normalisation(text: str, entry: str) -> None:
    hits = BLOCKLIST.match(text, "caption")
    assert entry in [h.entry for h in hits]
    hit = next(h for h in hits if h.entry == entry)
    assert hit.where == "caption" and entry in hit.reason and "caption" in hit.reason


@pytest.mark.parametrize(
    "text",
    [
        "Money can't buy happiness, but it is free to smile",
        "Our giveaway of crypto-art prints",  # different words in between
        "微信支付很方便",
        "Order number 12345",
        "",
    ],
)
def test_no_false_hits(text: str) -> None:
    assert BLOCKLIST.match(text, "caption") == []


def test_visible_text_hits_say_so() -> None:
    [hit] = BLOCKLIST.match("SCAN: FREE MONEY", "visible text")
    assert hit.reason == "blocklist: term 'free money' matched in visible text (\"free money\")"


def test_empty_blocklist_is_falsy() -> None:
    assert not Blocklist.from_policy({})
    assert Blocklist.from_policy({}).match("anything", "caption") == []


@pytest.mark.parametrize(
    "pattern",
    [
        "(a+)+$",
        r"(\w+\s?)*x",
        "(x+x+)+y",
        "(a|aa)+$",
        "(a|a)+b",
        r"(a)\1",
        "(?P<x>a)(?P=x)",
        "(.*a){12}",
    ],
)
def test_catastrophic_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(InvalidInput) as err:
        validate_pattern(pattern, LIMITS)
    assert err.value.code == "unsafe_pattern"


@pytest.mark.parametrize(
    ("pattern", "code"),
    [("(unclosed", "invalid_blocklist"), ("a*", "invalid_blocklist"), ("x" * 201, "invalid_blocklist")],
)
def test_broken_patterns_are_refused(pattern: str, code: str) -> None:
    with pytest.raises(InvalidInput) as err:
        validate_pattern(pattern, LIMITS)
    assert err.value.code == code


@pytest.mark.parametrize(
    "pattern", [r"1[3-9]\d{9}", "(?:ab)+c", r"[(+]+x", r"\p{Han}{2}币", "a{2,5}b", "(a|b)*c"]
)
def test_reasonable_patterns_pass(pattern: str) -> None:
    assert validate_pattern(pattern, LIMITS) == pattern
    assert structural_problem(pattern) is None


def test_validate_blocklist_limits_and_dedup() -> None:
    clean = validate_blocklist(["  spam  words ", "spam words", "加微信"], ["x+y"], LIMITS)
    assert clean == {"terms": ["spam words", "加微信"], "patterns": ["x+y"]}
    with pytest.raises(InvalidInput):
        validate_blocklist(["a"] * 3, [], BlocklistLimits(max_terms=2))
    with pytest.raises(InvalidInput):
        validate_blocklist(["!!!"], [], LIMITS)


@pytest.mark.parametrize(
    ("text", "entry"),
    [
        ("代開發票，正規", "代开发票"),  # Traditional caption, Simplified term
        ("免费送100元红包", r"免費送\d+元"),  # Simplified caption, Traditional pattern
        ("免費送100元紅包", r"免費送\d+元"),
        ("FREE   iPhone", r"ＦＲＥＥ\s+iphone"),  # a pattern typed with full-width letters
    ],
)
def test_entries_match_across_chinese_scripts_and_widths(text: str, entry: str) -> None:
    blocklist = Blocklist.from_policy(
        {"blocklist": validate_blocklist(["代开发票"], [r"免費送\d+元", r"ＦＲＥＥ\s+iphone"], LIMITS)}
    )
    assert entry in [hit.entry for hit in blocklist.match(text, "caption")]


def test_a_pattern_that_folding_breaks_still_runs_as_written() -> None:
    # A group name is no literal, but folding cannot tell: ﬁ becomes "(?:fi)", which no name may hold.
    pattern = "(?P<ﬁ>gift)card"
    blocklist = Blocklist.from_policy({"blocklist": validate_blocklist([], [pattern], LIMITS)})
    assert [hit.entry for hit in blocklist.match("a giftcard for you", "caption")] == [pattern]
