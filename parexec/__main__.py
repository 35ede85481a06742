"""``python -m parexec``: the same as the ``parexec`` command."""

from parexec.cli import main

raise SystemExit(main())
