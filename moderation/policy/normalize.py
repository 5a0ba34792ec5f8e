"""Text normalisation for policy matching: undoes case, width, invisible-character and spacing tricks.

Three forms of a text are used:

* ``folded`` — NFKC (full-width → half-width, ligatures, compatibility forms), case-folded, with
  invisible format characters (zero-width spaces and joiners, bidi controls, soft hyphens) and stray
  combining marks removed, common Cyrillic/Greek look-alikes mapped to Latin, Traditional Chinese
  characters mapped to Simplified ones, horizontal whitespace collapsed to one space and line breaks kept;
* ``despaced`` — the folded form with letter-by-letter spacing undone (``f r e e`` → ``free``) and
  separators between CJK characters removed (``输 出`` → ``输出``);
* ``compact`` — only the letters and digits of the folded form, with the positions where words begin
  and end (``boundaries``), so a term can be matched across punctuation tricks (``fr.ee-mo ney``) but only
  on whole words (``ass`` does not match inside ``class``).
"""

from __future__ import annotations

import importlib.util
import re
import unicodedata
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# Look-alikes that render identically to Latin letters in most fonts.
_CONFUSABLES = str.maketrans(
    {
        "а": "a",
        "в": "b",
        "е": "e",
        "ё": "e",
        "к": "k",
        "м": "m",
        "н": "h",
        "о": "o",
        "р": "p",
        "с": "c",
        "т": "t",
        "у": "y",
        "х": "x",
        "і": "i",
        "ї": "i",
        "ј": "j",
        "ѕ": "s",
        "ԁ": "d",
        "һ": "h",
        "ӏ": "l",
        "ԛ": "q",
        "ԝ": "w",
        "α": "a",
        "ε": "e",
        "ι": "i",
        "κ": "k",
        "ν": "v",
        "ο": "o",
        "ρ": "p",
        "τ": "t",
        "υ": "u",
        "χ": "x",
        "‹": "<",
        "›": ">",
        "«": "<",
        "»": ">",
        "〈": "<",
        "〉": ">",
        "《": "<",
        "》": ">",
        "【": "[",
        "】": "]",
        "“": '"',
        "”": '"',
        "„": '"',
        "‘": "'",
        "’": "'",
        "「": '"',
        "」": '"',
        "『": '"',
        "』": '"',
        "。": ".",
        "、": ",",
    }
)

_HSPACE_RE = re.compile(r"[^\S\n]+")
_NEWLINES_RE = re.compile(r"\s*\n\s*")
# Three or more single letters/digits separated by one to three non-word characters: "f r e e", "f.r.e.e".
_SPACED_LETTERS_RE = re.compile(r"(?<!\w)\w(?:[\W_]{1,3}\w(?!\w)){2,}")
# Kana, CJK ideographs and their extensions A to H (OpenCC maps some Traditional characters into C to E).
_CJK_CLASS = (
    "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\U00020000-\U0002a6df\U0002a700-\U0002ee5f\U00030000-\U000323af"
)
_CJK_RE = re.compile(f"[{_CJK_CLASS}]")
# Decorative separators between two CJK characters; clause punctuation (，。！？；：) is kept.
_CJK_GAP_RE = re.compile(f"(?<=[{_CJK_CLASS}])[\\s\\-_.·•*~|/\\\\+=]+(?=[{_CJK_CLASS}])")


def is_cjk(char: str) -> bool:
    """Whether a character belongs to a script written without spaces between words (CJK, kana)."""
    return bool(_CJK_RE.match(char))


# Hangul fillers: blank, and classed as letters, so the categories below keep them; used to split words.
_FILLERS = frozenset("\u115f\u1160\u3164\uffa0")


def _drop_invisible(text: str) -> str:
    # Cf: zero-width space/joiners, bidi controls, soft hyphen, BOM; Mn after NFKC: decoration such as
    # strike-through (U+0336) stacked on letters to dodge filters; Cc except line breaks and tabs.
    return "".join(
        ch
        for ch in text
        if ch in "\n\t"
        or (ch not in _FILLERS and unicodedata.category(ch) not in ("Cf", "Mn", "Me", "Cc", "Cs", "Co"))
    )


@cache
def _traditional_to_simplified() -> dict[int, str]:
    """OpenCC's character table (Traditional → Simplified), first choice of each, one character each."""
    spec = importlib.util.find_spec("opencc")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the opencc-python-reimplemented package (its conversion tables) is not installed")
    table: dict[int, str] = {}
    path = Path(next(iter(spec.submodule_search_locations))) / "dictionary" / "TSCharacters.txt"
    for line in path.read_text(encoding="utf-8").splitlines():
        source, _, targets = line.partition("\t")
        target = targets.split(" ")[0] if targets else ""
        if len(source) == 1 and len(target) == 1 and source != target:
            table[ord(source)] = target
    return table


def to_simplified(text: str) -> str:
    """``text`` with Traditional Chinese characters written in their Simplified form (one for one)."""
    return text.translate(_traditional_to_simplified())


def _fold_characters(text: str) -> str:
    """NFKC, case-folded, Simplified ``text`` without invisible characters or look-alikes (spacing untouched)."""
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    # Captions come in both Chinese scripts; a term written in one must match text written in the other.
    return to_simplified(_drop_invisible(text).translate(_CONFUSABLES))


def fold(text: str) -> str:
    """NFKC, case-folded, Simplified text without invisible characters or look-alikes, whitespace collapsed."""
    text = _fold_characters(text or "").replace("\r\n", "\n").replace("\r", "\n")
    text = _HSPACE_RE.sub(" ", text)
    return _NEWLINES_RE.sub("\n", text).strip()


def despace(folded: str) -> str:
    """The folded text with letter-by-letter spacing joined up and separators between CJK removed."""
    joined = _SPACED_LETTERS_RE.sub(lambda m: re.sub(r"[\W_]", "", m.group(0)), folded)
    return _CJK_GAP_RE.sub("", joined)


def fold_pattern(pattern: str) -> str:
    """A regular expression with its non-ASCII literals folded like text, so it matches folded text.

    Only non-ASCII characters change: they carry no regular-expression syntax, whereas folding ASCII
    would turn ``\\D`` into ``\\d``. Outside a character class a full-width or Traditional character
    becomes what ``fold`` makes of it in a text, escaped when that is punctuation (``。`` → ``\\.``) and
    grouped when it is several characters (``ß`` → ``(?:ss)``, so a quantifier still applies to all of
    it). Inside a class the folded character is added beside the original (``[賭]`` → ``[賭赌]``), except
    at the ends of a range, which keep their meaning.
    """
    out: list[str] = []
    in_class = False
    class_body_start = 0  # index in ``pattern`` where the current class's members begin
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        escaped = False
        if ch == "\\" and i + 1 < len(pattern):
            if ord(pattern[i + 1]) < 128:
                out.append(pattern[i : i + 2])  # an ASCII escape keeps its meaning; names after it are ASCII
                i += 2
                continue
            escaped, i, ch = True, i + 1, pattern[i + 1]  # "\\" + a non-ASCII character: a literal
        if not in_class and not escaped and pattern.startswith("(?#", i):
            close = pattern.find(")", i)  # a comment is copied as it is (its brackets are no class)
            close = len(pattern) - 1 if close == -1 else close
            out.append(pattern[i : close + 1])
            i = close + 1
            continue
        if in_class and not escaped and pattern.startswith("[:", i):
            close = pattern.find(":]", i + 2)  # a POSIX class such as [:alpha:] ends with ":]", not "]"
            if close != -1:
                out.append(pattern[i : close + 2])
                i = close + 2
                continue
        if in_class:
            if ch == "]" and not escaped and i > class_body_start:
                in_class = False
                out.append(ch)
            elif ord(ch) >= 128:
                out.append(_class_member(pattern, i, ch, escaped, class_body_start))
            else:
                out.append(ch)
            i += 1
            continue
        if ch == "[" and not escaped:
            in_class = True
            out.append(ch)
            i += 1
            if i < len(pattern) and pattern[i] == "^":
                out.append("^")
                i += 1
            class_body_start = i
            continue
        if ord(ch) >= 128:
            folded = _fold_characters(ch)
            if len(folded) == 1:
                out.append(folded if folded.isalnum() else re.escape(folded))
            else:  # several characters, or none (an invisible one): a group keeps a quantifier on it
                out.append("(?:" + re.escape(folded) + ")")
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def _class_member(pattern: str, i: int, ch: str, escaped: bool, body_start: int) -> str:
    """A non-ASCII member of a character class, with its folded form beside it where that is safe."""
    original = "\\" + ch if escaped else ch
    follows_dash = i - 1 > body_start and pattern[i - 1] == "-" and pattern[i - 2] != "\\"
    precedes_dash = i + 2 < len(pattern) and pattern[i + 1] == "-" and pattern[i + 2] != "]"
    folded = _fold_characters(ch)
    if follows_dash or precedes_dash or len(folded) != 1 or folded == ch:
        return original
    return original + re.escape(folded)


@dataclass(frozen=True)
class NormalizedText:
    """The matching forms of one text."""

    original: str
    folded: str
    despaced: str
    compact: str
    boundaries: frozenset[int]
    #: Boundaries between two words separated by whitespace only (no punctuation).
    spaced: frozenset[int] = frozenset()

    def contains_term(self, term: NormalizedText) -> bool:
        """Whether the (normalised) term occurs as whole words, or anywhere for CJK terms.

        Inside a match, the text may break words where the term does, between letters spelled one by
        one ("f r e e money"), or with punctuation inside a word ("fr.ee-mo ney"); "the hero in" does
        not hold "heroin" (see ``_breaks_fit``).
        """
        needle = term.compact
        if not needle:
            return False
        if any(is_cjk(ch) for ch in needle):
            return needle in self.compact
        breaks = sorted(self.boundaries)
        start = self.compact.find(needle)
        while start != -1:
            end = start + len(needle)
            if (
                start in self.boundaries
                and end in self.boundaries
                and self._breaks_fit(term, start, end, breaks)
            ):
                return True
            start = self.compact.find(needle, start + 1)
        return False

    def _breaks_fit(self, term: NormalizedText, start: int, end: int, breaks: list[int]) -> bool:
        """Whether the word breaks of the text inside ``[start, end)`` can be the term's own, or a disguise.

        Breaks where the term has them, and between letters spelled one by one, always fit. Other breaks
        fit when one of them is punctuation inside a word ("fr.ee-mo ney"): plain spaces alone separate
        real words ("the hero in this film" does not hold "heroin").
        """
        extra: list[int] = []
        for index in range(bisect_right(breaks, start), bisect_left(breaks, end)):
            at = breaks[index]
            if at - start in term.boundaries:
                continue
            if at - breaks[index - 1] == 1 or breaks[index + 1] - at == 1:
                continue  # letters spelled one by one
            extra.append(at)
        return not extra or any(at not in self.spaced for at in extra)


def normalize(text: str) -> NormalizedText:
    """All matching forms of ``text``."""
    folded = fold(text)
    chars: list[str] = []
    boundaries: set[int] = {0}
    spaced: set[int] = set()
    previous_was_word = False
    only_space = True  # the separator since the last word is whitespace only
    for ch in folded:
        if ch.isalnum():
            if not previous_was_word and chars and only_space:
                spaced.add(len(chars))
            if is_cjk(ch):
                boundaries.add(len(chars))
                boundaries.add(len(chars) + 1)
            chars.append(ch)
            previous_was_word = True
            only_space = True
        else:
            if previous_was_word:
                boundaries.add(len(chars))
            previous_was_word = False
            only_space = only_space and ch.isspace()
    boundaries.add(len(chars))
    return NormalizedText(
        original=text,
        folded=folded,
        despaced=despace(folded),
        compact="".join(chars),
        boundaries=frozenset(boundaries),
        spaced=frozenset(spaced),
    )
