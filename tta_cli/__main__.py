"""``python -m tta_cli``: the ``tta`` command, for environments without the console script."""

from tta_cli.cli import main

if __name__ == "__main__":
    main()
