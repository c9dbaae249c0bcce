"""The README's bad-input table, row by row: each command exits 2 with exactly its one-line message,
before any process group, model or data exists (no run artifacts, no traceback)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from launch.proc import run_process_group
from tests.train_utils import PY, REPO, Payload, _env


def table_rows() -> list[tuple[str, str, str]]:
    text = (REPO / "README.md").read_text()
    table = text.split("<!-- bad-input-table -->")[1].split("<!-- /bad-input-table -->")[0]
    rows = []
    for line in table.strip().splitlines()[2:]:  # after the header and its rule
        case, command, message = (c.strip() for c in line.strip().strip("|").split("|"))
        rows.append((case, command.strip("`"), message.strip("`")))
    return rows


ROWS = table_rows()


def test_the_table_covers_the_issue_list():
    """The cases the reliability issue names, each present (a row deleted from README fails here)."""
    cases = " / ".join(case for case, _, _ in ROWS)
    for needle in ("SP size not dividing", "not divisible by SP", "window wider", "num_global", "unknown pattern",
                   "unknown model", "missing data path", "empty data path", "vocabulary", "another model shape",
                   "negative seed", "infinite", "rotary", "FFN", "W&B online", "data too small", "batch larger",
                   "validation split", "not writable", "sees later keys"):
        assert needle in cases, needle


def saved_checkpoint(root: Path) -> Path:
    """A complete checkpoint directory of the default (tiny) config, as far as resume's checks read it."""
    from hydra import compose, initialize_config_dir

    import trainer.train  # noqa: F401  (registers the launch_stamp resolver)
    from trainer.config.validate import load_config
    from trainer.state import checkpoint

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = load_config(compose(config_name="config", overrides=["trainer.ckpt_dir=unused"]), 1)
    path = root / checkpoint.tag(50)
    path.mkdir(parents=True)
    (path / checkpoint.META).write_text(json.dumps({**checkpoint.run_meta(cfg, 50), "files": {}}))
    return path


def payload_checkpoint(root: Path) -> Path:
    """``saved_checkpoint`` with a DeepSpeed model file whose pickle would run code."""
    import torch

    path = saved_checkpoint(root)
    torch.save({"module": Payload(root / "PAYLOAD_RAN")}, path / "mp_rank_00_model_states.pt")
    return path


@pytest.mark.parametrize("case, command, message", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_fails_first_with_one_line(case, command, message, tmp_path):
    for d in ("empty", "tiny", "text"):
        (tmp_path / d).mkdir()
    (tmp_path / "tiny" / "a.txt").write_bytes(b"0123456789")
    (tmp_path / "text" / "a.txt").write_bytes(b"abcdefgh " * 4444 + b"abcd")  # 40,000 bytes
    (tmp_path / "file").write_bytes(b"")
    ckpt = saved_checkpoint(tmp_path / "ckpts") if "CKPT" in command else None
    payload = payload_checkpoint(tmp_path / "crafted") if "PAYLOAD" in command else None
    subst = {"EMPTY": str(tmp_path / "empty"), "CKPT": str(ckpt), "PAYLOAD": str(payload), "TINY": str(tmp_path / "tiny"),
             "TEXT": str(tmp_path / "text"), "FILE": str(tmp_path / "file")}

    def fill(s: str) -> str:
        return re.sub(r"\b(EMPTY|CKPT|PAYLOAD|TINY|TEXT|FILE)\b", lambda m: subst[m.group(1)], s)

    words = shlex.split(fill(command))
    env = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_]+=\S*", w))
    argv = [w for w in words if w not in {f"{k}={v}" for k, v in env.items()}]
    assert argv[:3] == ["python", "-m", "trainer.train"], command
    run_dir = tmp_path / "run"
    # RANK=0 without MASTER_ADDR: had the trainer reached init_process_group it would fail differently.
    proc = run_process_group([PY, *argv[1:], f"hydra.run.dir={run_dir}"], cwd=REPO, timeout=120,
                             env=_env(**{"WANDB_MODE": "disabled", "RANK": "0", **env}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [fill(message)], proc.stderr[-3000:]
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
    assert not (tmp_path / "crafted" / "PAYLOAD_RAN").exists()  # nothing in a checkpoint ran
