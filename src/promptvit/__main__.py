"""``python -m promptvit`` (and ``torchrun ... -m promptvit train ...``): the ``promptvit`` command."""

from promptvit.cli import main

main()
