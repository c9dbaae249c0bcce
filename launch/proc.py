"""Run a launcher command (torchrun and the ranks it starts) with a deadline that kills them all."""

from __future__ import annotations

import os
import signal
import subprocess


def run_process_group(argv: list[str], *, timeout: float, **popen_kw) -> subprocess.CompletedProcess:
    """Like ``subprocess.run(argv, capture_output=True, text=True, timeout=timeout)``, but the command
    gets its own session and a timeout SIGKILLs the whole group: killing only torchrun would leave
    its ranks running. Raises ``subprocess.TimeoutExpired`` after the group is gone."""
    proc = subprocess.Popen(argv, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, **popen_kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)
