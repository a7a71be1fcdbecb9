"""Faults met before the first step: damaged checkpoint, bad data, a retriever that answers garbage.

Each is a real `atpo train` that must end within seconds with one line ``atpo train: error: ...`` per
rank (the CLI's form for user errors) and no Python traceback from a rank; nothing is written to
``metrics.jsonl``. These all fail before the actor is built (the data and the checkpoint record are
checked first).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faultkit import fails_in_one_line_per_rank, run_atpo, tiny_http_server

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]


def test_damaged_checkpoint_record_on_two_ranks(tmp_path, train_args):
    """Issue 13 defect 4 end to end: a resume from a damaged ``atpo_checkpoint.json`` at 2 ranks."""
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    for step in (1, 2):
        (ckpt / f"step_{step:06d}").mkdir(parents=True)
        (ckpt / f"step_{step:06d}" / "atpo_checkpoint.json").write_text(json.dumps({"format": 1, "step": step}))
    record = ckpt / "step_000002" / "atpo_checkpoint.json"
    record.write_text('{"format": 1, "step": 2, "mod')
    (ckpt / "latest").write_text("2\n")
    result = run_atpo([*train_args(run_dir, 3), "--nproc-per-node", "2", "parallel.tp=2"], tmp_path,
                      check=False, timeout=300)
    [line] = set(fails_in_one_line_per_rank(result, ranks=2))
    assert f"{record} is damaged" in line and f"`echo 1 > {ckpt / 'latest'}`" in line
    assert "JSONDecodeError" not in result.stderr
    assert not (run_dir / "metrics.jsonl").exists()


def test_every_prompt_longer_than_the_budget(tmp_path, train_args):
    """Issue 13 defect 5: it warned and then died of a ZeroDivisionError."""
    result = run_atpo(train_args(tmp_path / "run", 2, "rollout.max_prompt_tokens=20"), tmp_path,
                      check=False, timeout=300)
    [line] = fails_in_one_line_per_rank(result)
    assert "configuration error: all " in line and "rollout.max_prompt_tokens=20" in line


def _dataset(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"question": "Who founded Orvane Industries?", "golden_answers": ["Ada Lee"]})


@pytest.mark.parametrize("lines, message", [
    ([GOOD, '{"question": "cut short', GOOD], "train.jsonl:2: invalid JSON"),
    ([], "has no rows"),
], ids=["malformed_json_line", "empty_file"])  # the other row errors: tests/unit/test_data.py
def test_bad_dataset_names_the_file_and_line(tmp_path, train_args, lines, message):
    data = _dataset(tmp_path, lines)
    result = run_atpo(train_args(tmp_path / "run", 2, f"data.train_files=[{data}]"), tmp_path,
                      check=False, timeout=300)
    [line] = fails_in_one_line_per_rank(result)
    assert message in line


def test_retriever_answering_garbage(tmp_path, train_args):
    """HTTP 200 with an HTML page (a proxy's error page, a wrong port): found by the start-up probe."""
    with tiny_http_server(lambda request: ("text/html", b"<html><body>502 Bad Gateway</body></html>")) as url:
        result = run_atpo(train_args(tmp_path / "run", 2, f"retriever.url={url}"), tmp_path, check=False, timeout=300)
    [line] = fails_in_one_line_per_rank(result)
    assert f"the retriever at {url} does not answer" in line and "502 Bad Gateway" in line
