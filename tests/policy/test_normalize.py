"""Normalisation undoes case, width, invisible-character, look-alike and spacing tricks."""

from __future__ import annotations

import pytest

from moderation.policy.normalize import fold, fold_pattern, is_cjk, normalize


@pytest.mark.parametrize(
    ("text", "folded"),
    [
        ("ＦＲＥＥ　ＭＯＮＥＹ", "free money"),
        ("Free\u200bMo\u200dney", "freemoney"),
        ("STRASSE Straße", "strasse strasse"),
        ("frее", "free"),  # Cyrillic е
        ("a  \t b\r\n\n  c", "a b\nc"),
        ("f\u0336r\u0336e\u0336e\u0336", "free"),  # strike-through combining marks
        ("加\ufeff微信", "加微信"),
    ],
)
def test_fold(text: str, folded: str) -> None:
    assert fold(text) == folded


def test_compact_form_keeps_word_boundaries() -> None:
    norm = normalize("fr.ee-mo ney!")
    assert norm.compact == "freemoney"
    assert norm.boundaries == {0, 2, 4, 6, 9}


def test_despaced_form_joins_spelled_out_words() -> None:
    assert normalize("i g n o r e this").despaced == "ignore this"
    assert normalize("f.r.e.e money").despaced == "free money"
    assert normalize("加 微 信，领红包").despaced == "加微信,领红包"


@pytest.mark.parametrize(
    ("text", "term", "found"),
    [
        ("FREE MONEY here", "free money", True),
        ("f r e e  m o n e y", "free money", True),
        ("fr.ee-mo ney", "free money", True),
        ("freemoney", "free money", True),
        ("a classy act", "ass", False),
        ("a.s.s", "ass", True),
        ("加 微 信 领红包", "加微信", True),
        ("请加我微信", "微信", True),
        ("WhatsApp联系我", "whatsapp", True),
    ],
)
def test_contains_term(text: str, term: str, found: bool) -> None:
    assert normalize(text).contains_term(normalize(term)) is found


@pytest.mark.parametrize(
    ("text", "term", "holds"),
    [
        ("He is the hero in this film", "heroin", False),  # two real words, only a space between
        ("an Al Pacino classic", "anal", False),
        ("buy heroin here", "heroin", True),
        ("h e r o i n", "heroin", True),  # spelled out letter by letter
        ("h.er-oin", "heroin", True),  # punctuation inside a word: a disguise
        ("Get FREE MONEY now", "free money", True),
        ("fr.ee-mo ney", "free money", True),
    ],
)
def test_a_term_spans_word_breaks_only_where_it_has_them_or_where_they_are_a_disguise(
    text: str, term: str, holds: bool
) -> None:
    assert normalize(text).contains_term(normalize(term)) is holds


def test_hangul_fillers_do_not_split_words() -> None:
    for filler in ("\u3164", "\u115f", "\u1160", "\uffa0"):
        assert normalize(f"fr{filler}ee money").contains_term(normalize("free money")), hex(ord(filler))


@pytest.mark.parametrize(
    ("text", "folded"),
    [
        ("免費領取", "免费领取"),
        ("頭髮 後來", "头发 后来"),
        ("ＷＥＩ信號", "wei信号"),
    ],
)
def test_fold_writes_traditional_chinese_in_simplified(text: str, folded: str) -> None:
    assert fold(text) == folded


@pytest.mark.parametrize(
    ("text", "term"),
    [
        ("加我微信領紅包", "领红包"),  # Traditional caption, Simplified term
        ("加我微信领红包", "領紅包"),  # Simplified caption, Traditional term
        ("線上賭博", "赌博"),
    ],
)
def test_terms_match_across_chinese_scripts(text: str, term: str) -> None:
    assert normalize(text).contains_term(normalize(term))


@pytest.mark.parametrize(
    ("pattern", "folded"),
    [
        (r"免費\d+元", r"免费\d+元"),  # Traditional → Simplified; the escape stays
        (r"ＦＲＥＥ\s*money", r"free\s*money"),  # full-width letters
        (r"\D\W|Straße", r"\D\W|Stra(?:ss)e"),  # ASCII escapes keep their case
        ("加。微信", r"加\.微信"),  # folds to punctuation: escaped, still a literal
        ("a\u200bb", "a(?:)b"),  # invisible characters dropped, as in text
        ("a\u200b?b", "a(?:)?b"),  # ... and a quantifier on one stays on nothing, not on the "a"
        ("(?#note [)龍", "(?#note [)龙"),  # a comment's bracket opens no class
        ("[[:alpha:]ß]", "[[:alpha:]ß]"),  # a POSIX class does not end the class
        (r"\（广告\）", r"\(广告\)"),  # an escaped non-ASCII literal stays a literal
        (r"\ｄ+", "d+"),  # a literal full-width letter, not the digit class
        ("ß{2}", "(?:ss){2}"),  # several characters: the quantifier still applies to all of them
        ("[賭]博", "[賭赌]博"),  # in a class, the folded character is added beside the original
        ("[^賭]", "[^賭赌]"),
        ("[萬-龜]", "[萬-龜]"),  # range ends keep their meaning
        ("[ﬁ]x", "[ﬁ]x"),  # a member that folds to several characters is left alone
    ],
)
def test_fold_pattern(pattern: str, folded: str) -> None:
    assert fold_pattern(pattern) == folded


def test_ideographs_of_the_later_extensions_are_cjk() -> None:
    # OpenCC writes some Traditional characters as ideographs of extensions C to E (U+2A700 on).
    assert is_cjk("\U0002b740") and is_cjk("\U00030000")
    assert normalize("x\U0002b740\U0002b741").contains_term(normalize("\U0002b741"))
