"""The prompt and the texts the rollout inserts (spec 2.1, 2.2)."""

import pytest

from atpo_megatron.env.prompts import (
    PREFIX,
    STOP_STRINGS,
    TOOL_LIMIT_NOTICE,
    build_messages,
    extract_search_query,
    format_question,
    format_tool_result,
)
from atpo_megatron.env.reward import format_ok


def test_single_system_message_with_question():
    messages = build_messages("  who built the Varlo Bridge  ")
    assert messages == [{"role": "system", "content": PREFIX + "\nuser\nwho built the Varlo Bridge?"}]
    assert build_messages("Who?")[0]["content"].endswith("\nuser\nWho?")  # no second "?"


def test_prefix_names_every_tag_and_boxed():
    for tag in ("<think>", "</think>", "<search>", "</search>", "<result>", "</result>", "<answer>", "</answer>"):
        assert tag in PREFIX
    assert "\\boxed{answer here}" in PREFIX


def test_format_question():
    assert format_question(" a question ") == "a question?"
    assert format_question("a question?") == "a question?"


def test_tool_texts():
    assert STOP_STRINGS == ("</search>",)
    assert format_tool_result("Page 1: x") == " <result>\nPage 1: x\n</result>"
    assert TOOL_LIMIT_NOTICE == (
        " I have reached the tool call limit and cannot make further tool calls. Let me provide the final "
        "answer based on the information I have gathered so far. \n\n"
    )


@pytest.mark.parametrize(
    "turn, expected",
    [
        ("<think>hmm</think> <search> Varlo Bridge builder </search>", "Varlo Bridge builder"),
        ("<search>first</search><result>r</result> <search>second</search>", "second"),
        ("<think>x</think> <search>   </search>", ""),
        ("<think>no call</think>", None),
        ("<search>unterminated", None),
        ("</search> only a closing tag", None),
    ],
)
def test_extract_search_query(turn, expected):
    assert extract_search_query(turn) == expected


def test_a_full_transcript_built_from_these_pieces_passes_the_format_check():
    turn1 = "<think> Search first. </think> <search> Varlo Bridge </search>"
    turn2 = " <think> Done. </think> <answer> The final answer is \\[ \\boxed{Orvane} \\] </answer>"
    assert format_ok(turn1 + format_tool_result("Page 1: The Varlo Bridge ...") + turn2)
