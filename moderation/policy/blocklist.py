"""Per-tenant blocklists: terms and regular expressions matched on normalised caption and visible text.

Terms are normalised like the text (see ``normalize``) and match whole words across case, width,
invisible-character, spacing and punctuation tricks; terms in CJK scripts match anywhere. Patterns use the
``regex`` package and are checked before they are stored (length, compile, no nested or stacked
quantifiers, no backreferences, a trial run on adversarial input) and run with a timeout on bounded text,
so a pattern can never stall a worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import regex

from moderation.errors import InvalidInput
from moderation.policy.normalize import NormalizedText, fold_pattern, normalize

logger = logging.getLogger(__name__)

MAX_TERM_CHARS = 200
#: Matching stops this far into a text; captions and visible text are capped well below it anyway.
MAX_MATCH_CHARS = 8000
_FLAGS = regex.IGNORECASE | regex.UNICODE | regex.VERSION0
# Exponential backtracking shows on short input already; 1,000 characters keeps quadratic but useful
# patterns such as "(?:ab)+c" acceptable.
_TRIAL_INPUTS = (
    "a" * 1000 + "!",
    "1" * 1000 + "x",
    " " * 1000 + "x",
    "ab" * 500 + "!",
    "加" * 1000 + "!",
    "a " * 500 + "!",
)


@dataclass(frozen=True)
class BlocklistLimits:
    """How large a tenant's blocklist may be and how long a pattern may run."""

    max_terms: int = 1000
    max_patterns: int = 100
    max_pattern_chars: int = 200
    timeout_ms: int = 25


TIMEOUT = "timeout"
_TIMED_OUT = "\x00timed out"  # never a match's text: matched text comes from normalised, NUL-free input


@dataclass(frozen=True)
class BlocklistHit:
    """A blocklist entry that matched, and where."""

    kind: str  # "term", "pattern", or "timeout" (a pattern that could not be checked in time)
    entry: str
    where: str  # "caption" or "visible text"
    excerpt: str

    @property
    def reason(self) -> str:
        """One line naming what matched where."""
        if self.kind == TIMEOUT:
            return f"blocklist: pattern '{self.entry}' could not be checked against the {self.where} in time"
        return f"blocklist: {self.kind} '{self.entry}' matched in {self.where} (\"{self.excerpt}\")"


def split_timeouts(hits: list[BlocklistHit]) -> tuple[list[BlocklistHit], list[BlocklistHit]]:
    """The matches, and the patterns that could not be checked in time (not matches: they mean review)."""
    return [hit for hit in hits if hit.kind != TIMEOUT], [hit for hit in hits if hit.kind == TIMEOUT]


@dataclass(frozen=True)
class Blocklist:
    """A tenant's validated blocklist."""

    terms: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    timeout_ms: int = 25
    _normalized_terms: tuple[NormalizedText, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_policy(cls, policy: dict[str, Any] | None, timeout_ms: int = 25) -> Blocklist:
        """The blocklist stored in a tenant's policy document (already validated when it was stored)."""
        data = (policy or {}).get("blocklist") or {}
        terms = tuple(str(t) for t in data.get("terms", []))
        return cls(
            terms=terms,
            patterns=tuple(str(p) for p in data.get("patterns", [])),
            timeout_ms=timeout_ms,
            _normalized_terms=tuple(normalize(t) for t in terms),
        )

    def __bool__(self) -> bool:
        return bool(self.terms or self.patterns)

    def match(self, text: str, where: str) -> list[BlocklistHit]:
        """Every entry that matches ``text`` after normalisation."""
        if not text or not self:
            return []
        norm = normalize(text[:MAX_MATCH_CHARS])
        hits: list[BlocklistHit] = []
        for term, normalized in zip(self.terms, self._normalized_terms, strict=True):
            if norm.contains_term(normalized):
                hits.append(BlocklistHit("term", term, where, _excerpt_of_term(norm, normalized)))
        for pattern in self.patterns:
            found = _search(pattern, norm, self.timeout_ms)
            if found is _TIMED_OUT:
                hits.append(BlocklistHit(TIMEOUT, pattern, where, ""))
            elif found is not None:
                hits.append(BlocklistHit("pattern", pattern, where, found))
        return hits


def _excerpt_of_term(norm: NormalizedText, term: NormalizedText) -> str:
    index = norm.folded.find(term.folded)
    if index != -1:
        return norm.folded[index : index + len(term.folded)]
    return term.compact


@lru_cache(maxsize=2048)
def _compiled(pattern: str) -> regex.Pattern[str]:
    # Text is matched in its folded form (Simplified, half-width, case-folded): so is the pattern. A pattern
    # folding breaks (a non-ASCII group name folded into one no name may hold) runs as written.
    try:
        return regex.compile(fold_pattern(pattern), _FLAGS)
    except regex.error:
        return regex.compile(pattern, _FLAGS)


def _search(pattern: str, norm: NormalizedText, timeout_ms: int) -> str | None:
    """The first match of a pattern on the folded, despaced or compact form; None when none; _TIMED_OUT."""
    compiled = _compiled(pattern)
    for form in (norm.folded, norm.despaced, norm.compact):
        try:
            found = compiled.search(form, timeout=timeout_ms / 1000)
        except TimeoutError:
            # Validation should make this rare, and text crafted to stall a pattern must not pass as clean
            # for it: the item goes to a person.
            logger.warning(
                "blocklist pattern %r timed out after %d ms: the item goes to review", pattern, timeout_ms
            )
            return _TIMED_OUT
        if found is not None:
            return str(found.group(0))[:80]
    return None


def _quantifier_at(pattern: str, i: int) -> int:
    """Length of the quantifier that starts at ``pattern[i]`` (``*``, ``+``, ``?``, ``{m,n}``), else 0."""
    if i >= len(pattern):
        return 0
    if pattern[i] in "*+?":
        return 1
    if pattern[i] == "{":
        end = pattern.find("}", i)
        inner = pattern[i + 1 : end] if end != -1 else ""
        if inner and all(c.isdigit() or c == "," for c in inner) and inner[0] != ",":
            return end - i + 1
    return 0


def _unbounded(quantifier: str) -> bool:
    """Whether a quantifier can repeat more than once (``*``, ``+``, ``{2,}``, ``{1,5}``)."""
    if quantifier in ("*", "+"):
        return True
    if not quantifier.startswith("{"):
        return False
    low, _, high = quantifier[1:-1].partition(",")
    most = int(low) if "," not in quantifier else (None if high == "" else int(high))
    return most is None or most > 1


def structural_problem(pattern: str) -> str | None:
    """Why a pattern risks catastrophic backtracking (a repeated group that itself repeats), or None."""
    stack: list[bool] = []  # per open group: does it contain a repeating quantifier?
    i = 0
    in_class = False
    previous_repeats = False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            nxt = pattern[i + 1 : i + 2]
            if not in_class and nxt.isdigit() and nxt != "0":
                return "backreferences are not allowed"
            if not in_class and nxt in ("g", "k") and pattern[i + 2 : i + 3] in ("<", "{", "'"):
                return "backreferences are not allowed"
            i += 2
            previous_repeats = False
            continue
        if in_class:
            if ch == "]":
                in_class = False
            i += 1
            continue
        if ch == "[":
            in_class = True
            i += 1
            if pattern[i : i + 1] == "^":
                i += 1
            if pattern[i : i + 1] == "]":
                i += 1
            previous_repeats = False
            continue
        if ch == "(":
            if pattern.startswith("(?P=", i) or pattern.startswith("(?&", i) or pattern.startswith("(?R", i):
                return "backreferences and recursion are not allowed"
            stack.append(False)
            i += 1
            previous_repeats = False
            continue
        if ch == ")":
            inner_repeats = stack.pop() if stack else False
            i += 1
            length = _quantifier_at(pattern, i)
            if length:
                quantifier = pattern[i : i + length]
                if inner_repeats and _unbounded(quantifier):
                    return "nested quantifiers (a repeated group that repeats inside) are not allowed"
                if _unbounded(quantifier) and stack:
                    stack[-1] = True
                i += length
                if pattern[i : i + 1] in ("?", "+"):
                    i += 1
            elif inner_repeats and stack:
                stack[-1] = True
            previous_repeats = False
            continue
        length = _quantifier_at(pattern, i)
        if length:
            quantifier = pattern[i : i + length]
            if previous_repeats and quantifier != "?":
                return "stacked quantifiers are not allowed"
            if _unbounded(quantifier):
                if stack:
                    stack[-1] = True
                previous_repeats = True
            i += length
            if pattern[i : i + 1] in ("?", "+"):
                i += 1
            continue
        previous_repeats = False
        i += 1
    return None


def validate_pattern(pattern: str, limits: BlocklistLimits) -> str:
    """Check a blocklist pattern is short, compiles, has no backtracking traps and runs fast; returns it."""
    pattern = pattern.strip()
    if not pattern:
        raise InvalidInput("a blocklist pattern is empty", code="invalid_blocklist")
    if len(pattern) > limits.max_pattern_chars:
        raise InvalidInput(
            f"blocklist pattern {pattern[:40]!r}… is longer than {limits.max_pattern_chars} characters",
            code="invalid_blocklist",
        )
    try:
        compiled = _compiled(pattern)
    except regex.error as exc:
        raise InvalidInput(
            f"blocklist pattern {pattern!r} does not compile: {exc}", code="invalid_blocklist"
        ) from exc
    problem = structural_problem(pattern)
    if problem is not None:
        raise InvalidInput(f"blocklist pattern {pattern!r} is unsafe: {problem}", code="unsafe_pattern")
    if compiled.search("") is not None:
        # A pattern that matches empty text matches every caption and would block everything.
        raise InvalidInput(f"blocklist pattern {pattern!r} matches empty text", code="invalid_blocklist")
    for trial in _TRIAL_INPUTS:
        try:
            compiled.search(trial, timeout=limits.timeout_ms / 1000)
        except TimeoutError as exc:
            raise InvalidInput(
                f"blocklist pattern {pattern!r} is unsafe: it runs too long on adversarial input",
                code="unsafe_pattern",
            ) from exc
    return pattern


def validate_term(term: str) -> str:
    """Check a blocklist term has letters or digits after normalisation; returns it trimmed."""
    term = " ".join(term.split())
    if not term or len(term) > MAX_TERM_CHARS:
        raise InvalidInput(
            f"blocklist terms must be 1 to {MAX_TERM_CHARS} characters", code="invalid_blocklist"
        )
    if not normalize(term).compact:
        raise InvalidInput(
            f"blocklist term {term!r} has no letters or digits after normalisation", code="invalid_blocklist"
        )
    return term


def validate_blocklist(
    terms: list[str], patterns: list[str], limits: BlocklistLimits
) -> dict[str, list[str]]:
    """A tenant's blocklist checked and de-duplicated, ready to store in its policy."""
    if len(terms) > limits.max_terms:
        raise InvalidInput(f"at most {limits.max_terms} blocklist terms", code="invalid_blocklist")
    if len(patterns) > limits.max_patterns:
        raise InvalidInput(f"at most {limits.max_patterns} blocklist patterns", code="invalid_blocklist")
    clean_terms = list(dict.fromkeys(validate_term(t) for t in terms))
    clean_patterns = list(dict.fromkeys(validate_pattern(p, limits) for p in patterns))
    return {"terms": clean_terms, "patterns": clean_patterns}
