"""Log lines: plain text for a terminal, one JSON object per line for the journal.

Under systemd (JOURNAL_STREAM set) every event is a JSON line the journal keeps as is
and tools (journalctl -o cat | jq) can filter by field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else was passed with extra= and is kept.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup(level: int, log_format: str, environ: Mapping[str, str]) -> None:
    """log_format: "text", "json" or "auto" (json when stderr goes to the journal)."""
    use_json = log_format == "json" or (log_format == "auto" and "JOURNAL_STREAM" in environ)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if use_json else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
