"""``python -m service``: the same as ``authsvc grpc``."""

from service.command import GRPC, main

raise SystemExit(main(GRPC, prog="python -m service"))
