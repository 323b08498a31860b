"""``python -m tempo.cli``: the same as the ``tempo`` command."""

from . import main

main()
