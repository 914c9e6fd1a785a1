"""``make proto``: generate the one copy of the AuthService stubs into the client package.

``protos/authsvc/v1/authsvc.proto`` is the source; the generated modules live
in ``clients/python/authsvc_client/v1/`` so that the server and every calling
service import the same code (``from authsvc_client.v1 import authsvc_pb2``).
protoc is run with ``-I protos`` so the descriptor keeps the canonical file
name ``authsvc/v1/authsvc.proto``; the only rewrite is the Python module path
of the generated imports (``authsvc.v1.authsvc_pb2`` would otherwise clash
with the ``authsvc`` command-line package). mypy-protobuf writes the ``.pyi``
stubs for both the messages and the gRPC classes.

``python -m authsvc.dev.protogen [OUT_DIR]`` writes into OUT_DIR (default: the
package in this checkout); ``tests/test_proto.py`` generates into a temporary
directory and compares.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
PROTO = "authsvc/v1/authsvc.proto"
PACKAGE_DIR = ROOT / "clients/python/authsvc_client/v1"
STUBS = ("authsvc_pb2.py", "authsvc_pb2.pyi", "authsvc_pb2_grpc.py", "authsvc_pb2_grpc.pyi")

# Only Python module paths move; proto names ("authsvc.v1.AuthService") stay.
_MODULE = re.compile(r"\bauthsvc\.v1(?=\.authsvc_pb2\b| import )")


def _plugin(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install the dev tools (mypy-protobuf)")
    return found


def generate(out_dir: Path) -> list[Path]:
    """Generate the stubs of :data:`PROTO` into ``out_dir``; return the files written."""
    with tempfile.TemporaryDirectory() as raw:
        tmp = Path(raw)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
                f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                f"--mypy_out={tmp}",
                f"--mypy_grpc_out={tmp}",
                PROTO,
            ],
            check=True,
            capture_output=True,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in STUBS:
            text = (tmp / "authsvc/v1" / name).read_text()
            target = out_dir / name
            target.write_text(_MODULE.sub("authsvc_client.v1", text))
            written.append(target)
        return written


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else PACKAGE_DIR
    for path in generate(out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
