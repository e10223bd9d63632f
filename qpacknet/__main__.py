"""``python -m qpacknet`` is the ``qpacknet`` command."""

from qpacknet.cli import main

raise SystemExit(main())
