"""``python -m webhook``: the same as ``authsvc webhook``."""

import sys

from authsvc.cli import main

raise SystemExit(main(["webhook", *sys.argv[1:]]))
