"""Structured logs: JSON lines with the context fields, or text with a key=value tail."""

from __future__ import annotations

import json
import logging

from proxmo.server.logging import JsonFormatter, TextFormatter


def _record(exc: bool = False) -> logging.LogRecord:
    record = logging.LogRecord("proxmo.server", logging.ERROR if exc else logging.INFO, __file__,
                               1, "request %s", ("done",), None)
    record.request_id, record.rpc, record.code, record.rows, record.ms = (
        "r-1", "ComputeAdvantages", "OK", 5129, 12.5)
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            record.exc_info = sys.exc_info()
    return record


def test_json_lines_carry_the_context() -> None:
    line = JsonFormatter().format(_record())
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["level"] == "info" and entry["logger"] == "proxmo.server"
    assert entry["msg"] == "request done"
    assert entry["ts"].endswith("Z")
    assert {k: entry[k] for k in ("request_id", "rpc", "code", "rows", "ms")} == {
        "request_id": "r-1", "rpc": "ComputeAdvantages", "code": "OK", "rows": 5129, "ms": 12.5}


def test_json_errors_carry_the_trace_in_one_line() -> None:
    line = JsonFormatter().format(_record(exc=True))
    entry = json.loads(line)
    assert "Traceback" in entry["exc"] and "ValueError: boom" in entry["exc"]


def test_text_lines_end_with_the_context() -> None:
    line = TextFormatter().format(_record())
    assert line.split(" ", 1)[1].startswith("INFO    proxmo.server: request done ")
    assert line.endswith("request_id=r-1 rpc=ComputeAdvantages code=OK rows=5129 ms=12.5")
