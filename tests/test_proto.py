"""The committed stubs are what `make proto` generates from the committed proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = "protos/authsvc/v1/authsvc.proto"
STUBS = ("authsvc_pb2.py", "authsvc_pb2.pyi", "authsvc_pb2_grpc.py")


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    (tmp_path / "protos/authsvc/v1").mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / PROTO)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            PROTO,
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    for name in STUBS:
        fresh = (tmp_path / "protos/authsvc/v1" / name).read_text()
        committed = (ROOT / "protos/authsvc/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto`"
