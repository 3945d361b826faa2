"""``python -m tgdaemon.localdc``: see :mod:`tgdaemon.localdc.cli`."""

from __future__ import annotations

from tgdaemon.localdc.cli import main

raise SystemExit(main())
