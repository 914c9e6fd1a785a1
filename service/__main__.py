"""``python -m service``: the same as ``authsvc grpc``."""

import sys

from service.cli import main

raise SystemExit(main(sys.argv[1:] or ["grpc"]))
