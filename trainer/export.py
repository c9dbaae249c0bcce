"""``python -m trainer.export``: the command users type; the tool lives in ``trainer/tools/export.py``."""

from trainer.tools.export import cli

if __name__ == "__main__":
    cli()
