"""``python -m trainer.coverage``: the command users type; the tool lives in ``trainer/tools/coverage.py``."""

from trainer.tools.coverage import cli

if __name__ == "__main__":
    cli()
