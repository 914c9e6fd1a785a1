"""The committed stubs are what `make proto` generates from the committed proto; one copy serves everyone."""

from __future__ import annotations

from pathlib import Path

import authsvc_client.v1
from authsvc.dev.protogen import PACKAGE_DIR, PROTO, STUBS, generate
from authsvc_client.v1 import authsvc_pb2


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    generate(tmp_path)
    for name in STUBS:
        fresh = (tmp_path / name).read_text()
        committed = (PACKAGE_DIR / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto`"


def test_the_server_imports_the_client_package_stubs() -> None:
    assert Path(authsvc_client.v1.__file__).parent == PACKAGE_DIR
    assert authsvc_pb2.DESCRIPTOR.name == PROTO
    assert authsvc_pb2.DESCRIPTOR.package == "authsvc.v1"
