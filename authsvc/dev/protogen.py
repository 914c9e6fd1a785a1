"""``make proto``: generate the one copy of the AuthService stubs into the client package.

``protos/authsvc/v1/authsvc.proto`` is the source; the generated modules live
in ``clients/python/authsvc_client/v1/`` so that the server and every calling
service import the same code (``from authsvc_client.v1 import authsvc_pb2``).
protoc is run with ``-I protos`` so the descriptor keeps the canonical file
name ``authsvc/v1/authsvc.proto``; the only rewrite is the Python module path
of the generated imports (``authsvc.v1.authsvc_pb2`` would otherwise clash
with the ``authsvc`` command-line package). mypy-protobuf writes the ``.pyi``
stubs for both the messages and the gRPC classes.

The generator is pinned: grpcio-tools 1.62.3 (protoc 25.1), in a virtual
environment of its own (``.venv-proto``, made on first use), since it needs an
older protobuf than the project's. Its ``_pb2.py`` is protobuf 4.25.1 gencode
and its ``_pb2_grpc.py`` carries no generated-version check, so the client
package works with grpcio >= 1.49.1 and protobuf >= 4.25.1 (up to the newest:
a runtime accepts gencode of its own version or older). A newer grpcio-tools
would raise both floors to its own version. mypy-protobuf's plugins come from
the project's environment.

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
GENERATOR = "1.62.3"  # grpcio-tools; the client package's floors follow from it (clients/python/pyproject.toml)
GENERATOR_VENV = ROOT / ".venv-proto"

# Only Python module paths move; proto names ("authsvc.v1.AuthService") stay.
_MODULE = re.compile(r"\bauthsvc\.v1(?=\.authsvc_pb2\b| import )")


def _plugin(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install the dev tools (mypy-protobuf)")
    return found


def generator() -> Path:
    """The python of :data:`GENERATOR_VENV` holding grpcio-tools :data:`GENERATOR` (made or repaired here)."""
    python = GENERATOR_VENV / "bin" / "python"
    probe = [str(python), "-c", "from importlib.metadata import version; print(version('grpcio-tools'))"]
    if python.exists() and subprocess.run(probe, capture_output=True, text=True).stdout.strip() == GENERATOR:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(GENERATOR_VENV)], check=True, capture_output=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"grpcio-tools=={GENERATOR}"],
        check=True,
        capture_output=True,
    )
    return python


def generate(out_dir: Path) -> list[Path]:
    """Generate the stubs of :data:`PROTO` into ``out_dir`` with the pinned generator; return the files written."""
    python = generator()
    with tempfile.TemporaryDirectory() as raw:
        tmp = Path(raw)
        subprocess.run(
            [
                str(python),
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
