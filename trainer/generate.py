"""``python -m trainer.generate``: the command users type; the tool lives in ``trainer/tools/generate.py``."""

from trainer.tools.generate import cli

if __name__ == "__main__":
    cli()
