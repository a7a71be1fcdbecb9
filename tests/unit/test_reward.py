"""Reward rules of spec 2.3, one hand-written case per rule."""

import pytest

from atpo_megatron.env.reward import extract_answer, f1_score, format_ok, normalize_answer, score

GOOD = (
    "<think> I need the founder. </think> <search> Orvane Industries founder </search>"
    " <result>\nPage 1: Orvane Industries was founded by Kel Mar.\n</result>"
    " <think> Found it. </think> <answer> The final answer is \\[ \\boxed{Kel Mar} \\] </answer>"
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  A   quick,\tbrown FOX! ", "quick brown fox"),
        ("an apple and the pear", "apple and pear"),
        ("Theater", "theater"),  # "the" only as a word
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "response, expected",
    [
        (GOOD, "Kel Mar"),
        ("<answer>\\boxed{\\text{a}_{1}}</answer>", "\\text{a}_{1}"),  # nested braces
        ("<answer>\\boxed{first} then \\boxed{second}</answer>", "second"),  # the last boxed
        ("<answer>\\boxed{outer \\boxed{inner}}</answer>", "inner"),
        ("\\boxed{outside} <answer>no box here</answer>", None),  # boxed outside the answer block
        ("<answer>\\boxed{in}</answer> \\boxed{after}", "in"),
        ("<answer>\\boxed{a}</answer> <answer>\\boxed{b}</answer>", "b"),  # the last answer block
        ("<answer>\\boxed{unclosed</answer>", None),
        ("<answer>\\boxed{x}", None),  # no </answer>
        ("no tags at all", None),
        ("<answer>\\boxed{}</answer>", ""),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize(
    "response, expected",
    [
        (GOOD, True),
        ("<think>x</think><answer>\\boxed{y}</answer>", True),  # no search at all
        ("<answer>\\boxed{y}</answer>", False),  # no think
        ("<think>x</think><think>y<answer>\\boxed{y}</answer>", False),  # unpaired think
        ("<think>x</think><answer>\\boxed{y}</answer><answer>\\boxed{y}</answer>", False),  # two answers
        ("<think>x</think><answer>\\boxed{y}", False),  # no </answer>
        ("<think>x</think></answer>\\boxed{y}<answer>", False),  # closing before opening
        ("<think>x</think><answer>y</answer>\\boxed{y}", False),  # boxed outside the answer block
        ("<think>x</think><search>q</search><answer>\\boxed{y}</answer>", False),  # search without result
        ("<think>x</think><result>r</result><search>q</search><answer>\\boxed{y}</answer>", False),  # result before
        ("<think>x</think><search>q<result>r</result></search><answer>\\boxed{y}</answer>", False),  # nested
        (  # the second search has no result of its own
            "<think>x</think><search>a</search><search>b</search><result>r</result><answer>\\boxed{y}</answer>",
            False,
        ),
        (
            "<think>x</think><search>a</search><result>r</result><search>b</search><result>s</result>"
            "<think>z</think><answer>\\boxed{y}</answer>",
            True,
        ),
    ],
)
def test_format_ok(response, expected):
    assert format_ok(response) is expected


def test_score_training():
    assert score(GOOD, ["kel mar"]) == 1.0
    assert score(GOOD, ["Someone Else", "Kel  Mar."]) == 1.0  # any golden answer, normalised
    assert score(GOOD, ["Kel"]) == 0.0  # a partial match is not an exact match
    assert score(GOOD, "Kel Mar") == 1.0
    bad_format = GOOD.replace("<think> Found it. </think>", "<think> Found it.")
    assert score(bad_format, ["Kel Mar"]) == -1.0
    assert score("<think>x</think><answer>\\boxed{unclosed</answer>", ["x"]) == -1.0  # no parsable answer


def test_score_evaluation_skips_format():
    no_think = "<answer>\\boxed{Kel Mar}</answer>"
    assert score(no_think, ["Kel Mar"], training=True) == -1.0
    assert score(no_think, ["Kel Mar"], training=False) == 1.0
    assert score(no_think, ["Other"], training=False) == 0.0
    assert score("I don't know", ["Kel Mar"], training=False) == 0.0


def test_f1_score():
    assert f1_score("Kel Mar", ["Kel Mar"]) == 1.0
    # prediction "kel" (1 token), golden "kel mar" (2): precision 1, recall 1/2, F1 2/3
    assert f1_score("Kel", ["Kel Mar"]) == pytest.approx(2 / 3)
    # the best golden answer counts: "the big red bridge" vs "red bridge" -> p 2/3, r 1, F1 0.8
    assert f1_score("the big red bridge", ["blue", "red bridge"]) == pytest.approx(0.8)
    assert f1_score("blue", ["red"]) == 0.0
    assert f1_score("", ["red"]) == 0.0
