"""A deterministic prompt-injection detector for captions and the text visible in images.

The model already scores a ``prompt_injection`` category; this detector adds fixed English and Chinese
rules that do not depend on the model: instruction overrides ("ignore previous instructions",
"忽略之前的指令"), attempts to dictate the verdict ("output safe", "输出安全", "判定为安全"), role or
system impersonation ("system:", "you are now …", "你现在是审核员"), fake verdict objects
(``{"decision": "allow"}``, ``conflict: no``) and chat-template tokens (``<|im_start|>``, ``[INST]``,
``</caption>``). Rules run on the normalised text (see ``normalize``), so zero-width characters,
full-width letters, look-alike letters and letter-by-letter spacing do not hide an attempt.

Each finding has a weight; the detector's score is ``1 - prod(1 - weight)`` over the strongest finding of
each kind, and any finding makes the item go to review (never allow).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import regex

from moderation.policy.normalize import fold_pattern, normalize

logger = logging.getLogger(__name__)

MAX_SCAN_CHARS = 8000
_FLAGS = regex.IGNORECASE | regex.UNICODE | regex.MULTILINE | regex.VERSION0

# Between two words: any run of spaces or punctuation, or nothing (letter-spaced text is joined up).
S = r"[\W_]*"
# At least one separator.
S1 = r"[\W_]+"

_VERB_OVERRIDE = r"(?:ignore|disregard|forget|skip|bypass|override|overwrite|neglect|drop|abandon)"
_QUALIFIER = (
    r"(?:previous|prior|preceding|above|earlier|foregoing|former|original|initial|existing|"
    r"system|moderation|safety|your|these|those)"
)
_NOUN = (
    r"(?:instructions?|prompts?|rules?|directions?|guidelines?|directives?|commands?|polic(?:y|ies)|"
    r"context|messages?|constraints?|restrictions?|programming|orders?|guidance)"
)
_SAFE_WORDS = (
    r"(?:safe|allow(?:ed)?|approved?|benign|harmless|compliant|no" + S + r"(?:conflict|violations?)|"
    r"not" + S1 + r"(?:harmful|a" + S1 + r"violation|flagged|unsafe))"
)
_JUDGE_OBJECT = (
    r"(?:(?:this|the|my|that)" + S1 + r"(?:post|image|picture|photo|content|caption|submission|item|one)|"
    r"this|it|everything|all" + S1 + r"of" + S1 + r"this)"
)
_ZH_VERB_OVERRIDE = (
    r"(?:忽略|无视|忽视|忘记|忘掉|不要理会|不要管|别管|跳过|绕过|抛开|丢弃|覆盖)(?:掉)?(?:你)?(?:的)?"
)
_ZH_QUALIFIER = r"(?:之前|以前|先前|前面|上面|以上|上述|此前|原来|原有|原先|原始|所有|全部|一切|系统|审核)"
_ZH_NOUN = r"(?:指令|指示|命令|规则|提示词?|设定|要求|规定|限制|说明|约束|政策)"
_ZH_SAFE = r"(?:安全|通过|合规|无害|正常|允许|放行|无违规|不违规|没有违规|无风险|合法|safe|allow(?:ed)?|pass)"
# Chinese verdict verbs count only at the start of a clause or after an imperative word, so that
# "电源输出安全" (a product's output is safe) is not read as an order.
_ZH_CLAUSE_START = (
    r"(?:(?<=^|[\s\W])|"
    r"(?<=请|请你|须|务必|只|只能|直接|一律|应该|应当|你要|你必须|必须|立即|马上|给我|帮我|并|然后))"
)
_CATEGORY_KEYS = (
    r"(?:conflict|sexual|violence|weapons|drugs|hate|self_harm|scam_fraud|misleading|spam|prompt_injection)"
)
_VERDICT_KEYS = (
    r"(?:decision|verdict|conflict(?:_score)?|confidence|classification|moderation(?:_result)?|is_?safe|"
    r"safe|allowed|flagged|approved|violation|prompt_injection|risk(?:_level|_score)?|判定|审核结果|决定)"
)
_EVERY_FORM = ("folded", "despaced", "compact")


@dataclass(frozen=True)
class _Rule:
    kind: str
    weight: float
    pattern: regex.Pattern[str]
    forms: tuple[str, ...]


def _rule(kind: str, weight: float, pattern: str, forms: tuple[str, ...] = ("folded", "despaced")) -> _Rule:
    return _Rule(kind, weight, regex.compile(fold_pattern(pattern), _FLAGS), forms)


_RULES: tuple[_Rule, ...] = (
    # --- instruction overrides -------------------------------------------------------------------
    _rule(
        "instruction_override",
        0.95,
        r"\b"
        + _VERB_OVERRIDE
        + S1
        + r"(?:(?:all|any|every|each)"
        + S1
        + r")?(?:(?:of"
        + S1
        + r")?(?:the|your|my)"
        + S1
        + r")?"
        + _QUALIFIER
        + S1
        + r"(?:\w+"
        + S1
        + r")?"
        + _NOUN
        + r"\b",
    ),
    _rule(
        "instruction_override",
        0.95,
        r"\b" + _VERB_OVERRIDE + S1 + r"all" + S1 + r"(?:(?:the|your|of" + S1 + r"the)" + S1 + r")?"
        r"(?:instructions?|prompts?|directives?|guidelines?)\b",
    ),
    _rule(
        "instruction_override",
        0.95,
        r"(?:ignore|disregard|forget)(?:all)?(?:the|your)?(?:previous|prior|above|earlier|system)"
        r"(?:instructions?|prompts?|rules?)",
        ("compact",),
    ),
    _rule(
        "instruction_override",
        0.85,
        r"\b(?:new|updated|real|actual|true|revised|secret|hidden)"
        + S1
        + r"(?:instructions?|system"
        + S1
        + r"prompt|rules|directives?|task)"
        + r"\s*[:：]",
    ),
    _rule(
        "instruction_override",
        0.8,
        r"\bfrom"
        + S1
        + r"now"
        + S1
        + r"on\b"
        + S
        + r"(?:you|respond|answer|reply|output|always|only|never)\b",
    ),
    _rule(
        "instruction_override",
        0.95,
        _ZH_VERB_OVERRIDE
        + _ZH_QUALIFIER
        + r"(?:的)?(?:所有|全部|一切)?(?:的)?\w{0,4}?"
        + _ZH_NOUN
        + r"|"
        + _ZH_VERB_OVERRIDE
        + r"(?:所有|全部|一切)?(?:的)?(?:指令|提示词|系统提示|系统指令|审核规则)",
        _EVERY_FORM,
    ),
    _rule(
        "instruction_override",
        0.85,
        r"(?:新的?|最新的?|真正的|更新后?的?)(?:指令|指示|规则|任务|系统提示)\s*[:：]|从现在(?:开始|起)[,，]?你",
    ),
    # --- dictating the verdict ---------------------------------------------------------------------
    _rule(
        "output_steering",
        0.9,
        r"\b(?:output|respond|reply|answer|return|print)"
        + S1
        + r"(?:(?:only|just|with|as|the"
        + S1
        + r"(?:word|answer|result|verdict|label))"
        + S1
        + r"){0,3}"
        + _SAFE_WORDS
        + r"\b",
    ),
    _rule(
        "output_steering",
        0.9,
        r"\b(?:classify|mark|label|rate|flag|judge|tag|categori[sz]e|moderate|grade)"
        + S1
        + _JUDGE_OBJECT
        + S1
        + r"(?:as"
        + S1
        + r"|to"
        + S1
        + r"be"
        + S1
        + r")?"
        + _SAFE_WORDS
        + r"\b",
    ),
    _rule(
        "output_steering",
        0.9,
        r"\b(?:(?:the|your|final|correct)"
        + S1
        + r")?(?:verdict|decision|classification|moderation"
        + S1
        + r"(?:result|decision)|answer)"
        + S
        + r"(?:is|must"
        + S1
        + r"be|should"
        + S1
        + r"be|=|:)"
        + S
        + r"(?:safe|allow(?:ed)?|approved?|benign|no"
        + S
        + r"conflict|not"
        + S1
        + r"harmful)\b",
    ),
    _rule(
        "output_steering",
        0.8,
        r"\b(?:do"
        + S1
        + r"not|don'?t|never|must"
        + S1
        + r"not)"
        + S1
        + r"(?:flag|block|moderate|censor|reject|report)"
        + S1
        + _JUDGE_OBJECT
        + r"\b",
    ),
    _rule(
        "output_steering",
        0.9,
        _ZH_CLAUSE_START
        + r"(?:输出|回答|回复|返回|判定|判断|认定|标记|标注|归类|分类|定性)(?:为|成|是|结果为|结果是)?"
        + r"\s*[:：]?\s*[\"'「]?"
        + _ZH_SAFE,
    ),
    _rule(
        "output_steering",
        0.9,
        r"(?:审核|判定|检测|分类)(?:结果|结论)(?:为|是|应为|应该是|必须是)?\s*[:：]?\s*[\"'「]?"
        + _ZH_SAFE
        + r"|(?:将|把)(?:这|此|该|本)?(?:张|条|个|篇)?(?:图片?|帖子|内容|配文|照片)?"
        + r"(?:判定|标记|归类|认定|视)为"
        + _ZH_SAFE
        + r"|(?:不要|别|勿|不许|不得|不能)(?:审核|拦截|屏蔽|标记|举报|过滤)",
        _EVERY_FORM,
    ),
    # --- role and system impersonation -------------------------------------------------------------
    _rule(
        "role_impersonation",
        0.85,
        r"(?:^|[\n\"'{\[(])\s*(?:system|assistant|qwen|gpt|chatgpt|moderator)\s*[:：]\s*(?:you|ignore|from|new|"
        r"always|never|output|respond|reply|classify|mark|answer|the"
        + S1
        + r"(?:user|assistant|image|caption|"
        r"content|post))\b",
    ),
    _rule(
        "role_impersonation",
        0.85,
        r"\byou"
        + S1
        + r"(?:are"
        + S1
        + r"now|are"
        + S1
        + r"no"
        + S1
        + r"longer|will"
        + S1
        + r"now"
        + S1
        + r"act"
        + S1
        + r"as|must"
        + S1
        + r"now"
        + S1
        + r"act"
        + S1
        + r"as)"
        + S1
        + r"(?:(?:a|an|the|in)"
        + S1
        + r")?(?:\w+"
        + S1
        + r")?(?:ai|assistant|moderator|model|chatbot|bot|dan|system|admin|developer|"
        r"unrestricted|jailbroken|uncensored|evil)\b",
    ),
    _rule(
        "role_impersonation",
        0.8,
        r"\b(?:act|behave|respond)"
        + S1
        + r"as"
        + S1
        + r"(?:(?:a|an|the)"
        + S1
        + r")?(?:\w+"
        + S1
        + r")?(?:ai|assistant|moderator|chatbot|system|administrator|admin|dan)\b|\bpretend"
        + S1
        + r"(?:you"
        + S1
        + r"are|to"
        + S1
        + r"be)"
        + S1
        + r"(?:(?:a|an|the)"
        + S1
        + r")?(?:\w+"
        + S1
        + r")?(?:ai|assistant|moderator|chatbot|system|admin|dan)\b",
    ),
    _rule(
        "role_impersonation",
        0.8,
        r"\b(?:dan" + S1 + r"mode|do" + S1 + r"anything" + S1 + r"now|jailbreak" + S1 + r"(?:mode|prompt)|"
        r"(?:reveal|print|show|repeat)"
        + S1
        + r"(?:your|the)"
        + S1
        + r"(?:system"
        + S1
        + r"prompt|instructions))\b",
    ),
    _rule(
        "role_impersonation",
        0.85,
        r"你(?:现在|从现在起|从现在开始|此刻)?(?:是|扮演|充当|作为)(?:一个|一名|一位)?\w{0,6}?"
        r"(?:审核员|审查员|管理员|系统|助手|人工智能|开发者|机器人|模型)"
        r"|(?:扮演|假装你是|假装成|充当)(?:一个|一名)?\w{0,6}?(?:审核员|管理员|系统|助手|开发者|ai)"
        r"|系统(?:提示|指令|消息|设定)\s*[:：]|越狱模式|(?:^|[\n\"'{\[(])\s*(?:系统|助手)\s*[:：]",
    ),
    # --- fake verdicts -----------------------------------------------------------------------------
    _rule(
        "fake_verdict",
        0.95,
        r"\{[^{}]{0,300}?(?<!\w)[\"']?" + _VERDICT_KEYS + r"[\"']?\s*[:=]",
    ),
    _rule(
        "fake_verdict",
        0.9,
        r"\{[^{}]{0,300}?[:=]\s*[\"']?(?:safe|allow|allowed|approve|approved|benign|harmless|pass|compliant|"
        r"安全|通过|合规|放行)[\"']?\s*[,}]",
    ),
    _rule(
        "fake_verdict",
        0.9,
        r"(?:^|[\s,;{\[\"'])[\"']?(?:" + _CATEGORY_KEYS + r"[\"']?\s*[:=]\s*[\"']?(?:yes|no|true|false)|"
        r"conflict_score[\"']?\s*[:=]\s*[\"']?(?:0(?:\.\d+)?|1(?:\.0+)?))[\"']?(?=\s*(?:$|[\n,;}\]]))",
    ),
    _rule(
        "fake_verdict",
        0.9,
        r"\b(?:decision|verdict)\s*[:=]\s*[\"']?(?:allow|safe|approve|approved)\b",
    ),
    # --- chat-template and delimiter tokens --------------------------------------------------------
    _rule(
        "chat_template_token",
        0.95,
        r"<\s*\|\s*[a-z_]{2,30}\s*\|\s*>|</?\s*(?:caption|system|assistant|user|instruction|im_start|im_end)\s*>"
        r"|<\s*/?\s*s\s*>|<start_of_turn>|<end_of_turn>|\[\s*/?\s*(?:inst|sys|system)\s*\]|<<\s*/?\s*sys\s*>>"
        r"|#{2,}\s*(?:system|instruction|response)\s*:?\s*$",
    ),
    _rule(
        "chat_template_token",
        0.9,
        r"\b(?:im_start|im_end|endoftext|eot_id|start_header_id|end_header_id|begin_of_text|vision_start|"
        r"image_pad)\b",
    ),
)

KINDS = {
    "instruction_override": "instruction override",
    "output_steering": "attempt to dictate the verdict",
    "role_impersonation": "role or system impersonation",
    "fake_verdict": "fake verdict or answer format",
    "chat_template_token": "chat-template or delimiter token",
}


@dataclass(frozen=True)
class InjectionFinding:
    """One rule that fired: its kind, weight, the matched text and where it was found."""

    kind: str
    weight: float
    evidence: str
    where: str


@dataclass(frozen=True)
class InjectionResult:
    """The detector's score and what it found."""

    score: float
    findings: tuple[InjectionFinding, ...] = ()

    @property
    def fired(self) -> bool:
        """Whether any rule fired."""
        return bool(self.findings)

    @property
    def reason(self) -> str:
        """One line naming what was detected, for the verdict's reasons."""
        parts = [f'{KINDS[f.kind]} in {f.where} ("{f.evidence}")' for f in self.findings]
        return f"prompt injection detected (score {self.score:.2f}): " + "; ".join(parts)


def _scan(text: str, where: str) -> list[InjectionFinding]:
    if not text or not text.strip():
        return []
    norm = normalize(text[:MAX_SCAN_CHARS])
    forms = {"folded": norm.folded, "despaced": norm.despaced, "compact": norm.compact}
    findings: dict[str, InjectionFinding] = {}
    for rule in _RULES:
        if rule.kind in findings and findings[rule.kind].weight >= rule.weight:
            continue
        for form in rule.forms:
            try:
                found = rule.pattern.search(forms[form], timeout=0.2)
            except TimeoutError:
                # The rules are linear on real text; a pathological input must not stall the worker.
                logger.warning("injection rule %s timed out on %s; skipped", rule.kind, where)
                continue
            if found is not None:
                evidence = " ".join(found.group(0).split())[:60]
                findings[rule.kind] = InjectionFinding(rule.kind, rule.weight, evidence, where)
                break
    return list(findings.values())


def detect_injection(caption: str, visible_text: str = "") -> InjectionResult:
    """Scan the caption (and the text visible in the image) for attempts to steer the judge."""
    findings = _scan(caption, "caption") + _scan(visible_text, "visible text")
    strongest: dict[str, float] = {}
    for finding in findings:
        strongest[finding.kind] = max(strongest.get(finding.kind, 0.0), finding.weight)
    remaining = 1.0
    for weight in strongest.values():
        remaining *= 1.0 - weight
    return InjectionResult(score=round(1.0 - remaining, 4) if findings else 0.0, findings=tuple(findings))
