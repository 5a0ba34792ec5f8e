"""Where a generated reply ends: end of sequence, or the blank line that closes its explanation line."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moderation.engine.decoder import ReplyEnd
from moderation.engine.scoring import cut_reply, reply_end_tokens


@pytest.fixture(scope="module")
def tokenizer(engine: Any) -> Any:
    """The real Qwen tokenizer of the fixture model."""
    return engine._tokenizer


@pytest.fixture(scope="module")
def reply_end(engine: Any, tokenizer: Any) -> ReplyEnd:
    """The rule as the engine builds it."""
    return ReplyEnd(engine._eos_ids, reply_end_tokens(tokenizer), device=torch.device("cpu"))


def _end(reply_end: ReplyEnd, tokenizer: Any, text: str, eos: bool = False) -> str:
    ids = tokenizer.encode(text, add_special_tokens=False) + ([reply_end.eos[0].item()] if eos else [])
    stop = int(reply_end.first_stop(torch.tensor([ids]))[0])
    return str(tokenizer.decode(ids[: stop + 1], skip_special_tokens=True))


@pytest.mark.parametrize(
    ("reply", "kept"),
    [
        (
            "Description: A cat.\nVisible text: none\nExplanation: The caption matches.\n\nconflict: no\nspam: no",
            "Description: A cat.\nVisible text: none\nExplanation: The caption matches.\n\n",
        ),
        (  # a blank line inside the visible text is not the end
            "Description: A poster.\nVisible text: SALE\n\n50% OFF\nExplanation: It is an advert.\n\nconflict: no",
            "Description: A poster.\nVisible text: SALE\n\n50% OFF\nExplanation: It is an advert.\n\n",
        ),
        (  # nor is the label's word inside a line (使用说明: "instructions for use")
            "描述：一张海报。\n图中文字：使用说明\n\n第一步\n说明：配文与图片相符。\n\nconflict: no",
            "描述：一张海报。\n图中文字：使用说明\n\n第一步\n说明：配文与图片相符。\n\n",
        ),
        (  # nor a line of image text that starts with the label's word but is no label (no colon)
            "Description: A form.\nVisible text: Terms\nExplanation of terms\n\nSee below\n"
            "Explanation: An ordinary form.\n\nconflict: no",
            "Description: A form.\nVisible text: Terms\nExplanation of terms\n\nSee below\n"
            "Explanation: An ordinary form.\n\n",
        ),
        (
            "描述：促销单。\n图中文字：解释权归本公司所有\n\n限时\n说明：普通广告。\n\nconflict: no",
            "描述：促销单。\n图中文字：解释权归本公司所有\n\n限时\n说明：普通广告。\n\n",
        ),
        (  # markdown around the label
            "**Description:** A cat.\n**Visible text:** none\n**Explanation:** It matches.\n\nconflict: no",
            "**Description:** A cat.\n**Visible text:** none\n**Explanation:** It matches.\n\n",
        ),
        (
            "描述：一只猫。\n图中文字：无\n**说明**：相符。\n\nconflict: no",
            "描述：一只猫。\n图中文字：无\n**说明**：相符。\n\n",
        ),
        (
            "**Description:** A cat.\n**Visible text:** none\n**Explanation:**\n\nIt matches.\n\nconflict: no",
            "**Description:** A cat.\n**Visible text:** none\n**Explanation:**\n\nIt matches.\n\n",
        ),
        (  # a blank line right after the label is not the end: the explanation follows it
            "Description: A cat.\nVisible text: none\nExplanation:\n\nIt matches.\n\nconflict: no",
            "Description: A cat.\nVisible text: none\nExplanation:\n\nIt matches.\n\n",
        ),
        (  # Windows line ends
            "Description: A cat.\r\nVisible text: none\r\nExplanation: It matches.\r\n\r\nconflict: no",
            "Description: A cat.\r\nVisible text: none\r\nExplanation: It matches.\r\n\r\n",
        ),
    ],
)
def test_a_reply_ends_at_the_blank_line_after_its_explanation(
    reply_end: ReplyEnd, tokenizer: Any, reply: str, kept: str
) -> None:
    assert _end(reply_end, tokenizer, reply) == kept
    # The remote backend cuts the text it gets back at the same place.
    assert cut_reply(reply) == kept.rstrip()


def test_end_of_sequence_ends_a_reply_and_a_cut_reply_is_kept_whole(
    reply_end: ReplyEnd, tokenizer: Any
) -> None:
    short = "Description: A cat.\nVisible text: none\nExplanation: fine."
    assert _end(reply_end, tokenizer, short, eos=True) == short
    assert _end(reply_end, tokenizer, short) == short  # the cap cut it: every token is kept
    rows = [tokenizer.encode(t, add_special_tokens=False)[:6] for t in ("Description: a b c d e f", "x " * 9)]
    assert reply_end.first_stop(torch.tensor(rows)).tolist() == [6, 6]


def test_a_forced_length_holds_off_the_blank_line_rule(engine: Any, tokenizer: Any) -> None:
    ids = tokenizer.encode("\nExplanation: it is ok.\n\nmore text here", add_special_tokens=False)
    blank_at = len(ids) - len(tokenizer.encode("more text here", add_special_tokens=False)) - 1
    for min_tokens, stop in ((blank_at + 1, len(ids)), (blank_at, blank_at)):
        # Like end-of-sequence, which is masked before token index min_tokens.
        forced = ReplyEnd(
            engine._eos_ids, reply_end_tokens(tokenizer), device=torch.device("cpu"), min_tokens=min_tokens
        )
        assert int(forced.first_stop(torch.tensor([ids]))[0]) == stop


@pytest.mark.parametrize(
    "reply",
    [
        "描述：猫。\n图中文字：无\n说明：\n配文相符。\n\nconflict: no",  # content on the next line
        "描述：猫。\n图中文字：无\n说明：\n\n配文相符。\n\nconflict: no",  # after a blank line
        "描述：猫。\n图中文字：无\n- 说明：配文相符。\n\nconflict: no",  # a list item
        "描述：猫。\n图中文字：无\n## 说明：配文相符。\n\nconflict: no",  # a heading
        "描述：猫。\n图中文字：无\n 说明：配文相符。\n\nconflict: no",  # a space before the label
        "Description: x\nVisible text: none\n- **Explanation:** fine.\n\nconflict: no",
        "Description: x\nVisible text: none\n### **Explanation:** fine.\n\nconflict: no",
        "Description: x\nVisible text: none\n\tExplanation: fine.\n\nconflict: no",
        "Explanation: fine.\n\nconflict: no",  # the label is the reply's first token
        "Description: x\nVisible text: none\nExplanation: fine.\n \nconflict: no",  # a blank line in two tokens
        "Description: x\nVisible text: none\nExplanation ： fine.\n\nconflict: no",  # a space and a wide colon
    ],
)
def test_both_backends_end_a_reply_in_the_same_place(reply_end: ReplyEnd, tokenizer: Any, reply: str) -> None:
    kept = _end(reply_end, tokenizer, reply).rstrip()
    assert kept == cut_reply(reply) and "conflict" not in kept and kept.endswith(("fine.", "相符。"))
