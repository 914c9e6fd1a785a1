"""``python -m authsvc.dev.nootel COMMAND ...``: an ``authsvc`` command run as if the ``otel`` extra were not installed.

Every import of ``opentelemetry`` fails, as in an install without the extra.
For the tests (the server works without it; an endpoint without it is a
startup problem) and the tracing benchmark's baseline. One process only: spawned
workers would import it again.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    sys.modules["opentelemetry"] = None  # type: ignore[assignment]  # import opentelemetry.* raises ImportError

    from authsvc.cli import main

    sys.exit(main(sys.argv[1:]))
