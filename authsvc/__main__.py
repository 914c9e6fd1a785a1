"""``python -m authsvc``: the ``authsvc`` command."""

from authsvc.cli import main

raise SystemExit(main())
