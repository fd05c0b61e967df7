from __future__ import annotations

import json
import logging

import pytest

from hostagent.logs import JsonFormatter, setup


def record(**extra: object) -> logging.LogRecord:
    rec = logging.makeLogRecord(
        {
            "name": "hostagent.reconciler",
            "levelname": "WARNING",
            "levelno": 30,
            "msg": "%s: attempt %d failed",
            "args": ("demo/m1", 2),
        }
    )
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_json_line_has_fields_and_extras() -> None:
    line = JsonFormatter().format(record(cluster="demo"))
    data = json.loads(line)
    assert data["level"] == "warning"
    assert data["logger"] == "hostagent.reconciler"
    assert data["message"] == "demo/m1: attempt 2 failed"
    assert data["cluster"] == "demo"
    assert "\n" not in line


@pytest.mark.parametrize(
    ("log_format", "environ", "json_lines"),
    [("auto", {"JOURNAL_STREAM": "8:123"}, True), ("auto", {}, False), ("json", {}, True),
     ("text", {"JOURNAL_STREAM": "8:1"}, False)],
)  # fmt: skip
def test_auto_picks_json_under_the_journal(
    log_format: str, environ: dict[str, str], json_lines: bool
) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup(logging.INFO, log_format, environ)
        assert isinstance(root.handlers[0].formatter, JsonFormatter) is json_lines
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
