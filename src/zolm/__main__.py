"""``python -m zolm ...`` is the ``zolm`` command."""

from zolm.cli import main

raise SystemExit(main())
