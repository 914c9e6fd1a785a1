"""``python -m service``: the same as ``authsvc grpc``."""

import sys

from authsvc.cli import main

raise SystemExit(main(["grpc", *sys.argv[1:]]))
