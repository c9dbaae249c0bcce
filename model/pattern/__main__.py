"""``python -m model.pattern ...``: the pattern viewer (see ``model/pattern_cli.py``); a bad override is one
line, the same one the trainer gives (``trainer.config.compose``)."""

import sys

from model.pattern_cli import main
from trainer.config.compose import composition_error

if (problem := composition_error(sys.argv[1:], "pattern")) is not None:
    raise SystemExit(f"error: {problem}")
main()
