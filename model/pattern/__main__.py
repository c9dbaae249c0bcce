"""``python -m model.pattern ...``: the pattern viewer (see ``model/pattern_cli.py``)."""

from model.pattern_cli import main

main()
