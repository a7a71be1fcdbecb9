"""The agent's prompt and the text the rollout inserts between turns (spec 2.1, 2.2).

One turn of the loop: the policy generates until it emits ``</search>`` (a tool call, see
``STOP_STRINGS``) or EOS; the rollout runs ``extract_search_query`` on the turn, searches, and
appends ``format_tool_result(text)`` as masked tokens before the next turn.
"""

from __future__ import annotations

# Written for this project in the spirit of the paper's Fig. 6 prompt (same tags, same example shape).
PREFIX = (
    "You are a helpful assistant who answers a question step by step, using a Wikipedia search "
    "tool to look up facts you are not sure about. First think about the question, then give the "
    "answer. Write your reasoning inside <think> </think> and your final answer inside "
    "<answer> </answer>. To search, write a query inside <search> </search>; the search results "
    "will then be shown to you inside <result> </result>. You can search as many times as you need. "
    "For example: <think> This is my reasoning. </think> <search> a search query </search> "
    "<result> search results </result> <think> More reasoning. </think> "
    "<answer> The final answer is \\[ \\boxed{answer here} \\] </answer>. "
    "Always put the exact final answer inside \\boxed{} in LaTeX form, at the end of the answer."
)

STOP_STRINGS: tuple[str, ...] = ("</search>",)
"""Generation stops here: the turn is a tool call."""

TOOL_LIMIT_NOTICE = (
    " I have reached the tool call limit and cannot make further tool calls. Let me provide the "
    "final answer based on the information I have gathered so far. \n\n"
)
"""Inserted (loss-masked) instead of running a call beyond the limit; generation then continues."""


def format_question(question: str) -> str:
    """Strip the question and end it with "?" (as the paper's data scripts do)."""
    question = question.strip()
    return question if question.endswith("?") else question + "?"


def build_messages(question: str) -> list[dict[str, str]]:
    """The paper's chat: a single system message, PREFIX + "\\nuser\\n" + question."""
    return [{"role": "system", "content": PREFIX + "\nuser\n" + format_question(question)}]


def format_tool_result(text: str) -> str:
    """The observation appended after a tool call: ``" <result>\\n{text}\\n</result>"``."""
    return f" <result>\n{text}\n</result>"


def extract_search_query(turn_text: str) -> str | None:
    """The stripped content of the turn's last ``<search>...</search>``.

    Returns "" for an empty call (``<search> </search>``) and None when the turn has no complete
    search block. ``turn_text`` must include the stop string ``</search>``.
    """
    end = turn_text.rfind("</search>")
    if end < 0:
        return None
    start = turn_text.rfind("<search>", 0, end)
    if start < 0:
        return None
    return turn_text[start + len("<search>") : end].strip()
