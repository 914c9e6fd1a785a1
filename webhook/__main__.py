"""``python -m webhook``: the same as ``authsvc webhook``."""

from service.command import main
from webhook.command import WEBHOOK

raise SystemExit(main(WEBHOOK, prog="python -m webhook"))
