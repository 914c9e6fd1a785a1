"""``python -m webhook``: the same as ``authsvc webhook``."""

from service.cli import main

raise SystemExit(main(["webhook"]))
