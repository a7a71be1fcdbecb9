"""End every process a test launched, wherever it went: new sessions, other process groups, orphans.

Killing a launcher's process group is not enough: torchrun starts each rank in a session of its own,
and a rank killed with SIGKILL leaves its own children (multiprocessing helpers of the checkpoint
writer, a retriever server) re-parented to init, in a group nobody kills. So a test puts a unique tag
in the environment of what it launches; every descendant inherits it, and afterwards the test kills
whatever still carries the tag (Linux ``/proc``; elsewhere nothing is found).

    env, tag = tagged(os.environ)
    subprocess.run(cmd, env=env)
    kill_tagged(tag)          # returns the pids it had to kill
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

TAG_VARIABLE = "ATPO_TEST_TAG"


def tagged(env: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """A copy of ``env`` with a fresh tag, and the tag."""
    tag = uuid.uuid4().hex
    return {**env, TAG_VARIABLE: tag}, tag


def tagged_pids(tag: str) -> list[int]:
    """Live processes (zombies aside) whose environment carries ``tag``."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and not _zombie(entry):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _zombie(entry: Path) -> bool:
    return (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def kill_tagged(tag: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process carrying ``tag`` and wait (at most ``timeout`` s) until none is left."""
    killed = []
    deadline = time.monotonic() + timeout
    while (pids := [p for p in tagged_pids(tag) if p != os.getpid()]) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    return sorted(set(killed))
