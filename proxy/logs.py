"""Logging set-up: human text or one JSON object per line, plus the access log line for each request.

In JSON mode *every* line the proxy writes (banner, warnings, access log) is a JSON object, so that log
shippers can parse all of it. Secrets never reach a log call: only fingerprints do.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

ACCESS_LOGGER = "odata_auth_proxy.access"
ROOT_LOGGER = "odata_auth_proxy"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S")

    def formatException(self, ei: Any) -> str:
        # one line, no traceback: a traceback can carry local values and is not actionable for users
        return f"  ({ei[0].__name__})" if ei and ei[0] else ""


def setup_logging(log_format: str, verbose: bool, stream: Any = None) -> None:
    """Route the proxy's and aiohttp's loggers to stderr in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # aiohttp's own access log is replaced by ours; its server errors stay, at warning level
    logging.getLogger("aiohttp.access").setLevel(logging.CRITICAL + 1)
    logging.getLogger("aiohttp").setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.WARNING)


def log_event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log ``message``; in JSON mode ``fields`` become keys of the object."""
    logger.log(level, message, extra={"fields": fields})


def access_log_line(
    *,
    client: str | None,
    method: str,
    target: str,
    status: int,
    bytes_out: int,
    duration: float,
    route: str | None,
    upstream_status: int | None,
    token_fp: str | None,
    request_id: str | None,
) -> tuple[str, dict[str, Any]]:
    """The access log message and its structured fields (same facts, two spellings)."""
    fields: dict[str, Any] = {
        "client": client or "-",
        "method": method,
        "path": target,
        "status": status,
        "bytes": bytes_out,
        "duration_ms": round(duration * 1000, 2),
        "route": route or "-",
        "upstream_status": upstream_status,
        "token_fp": token_fp or "-",
        "request_id": request_id or "-",
    }
    message = (
        f'{fields["client"]} "{method} {target}" {status} {bytes_out}B {fields["duration_ms"]}ms '
        f"route={fields['route']} upstream={upstream_status if upstream_status is not None else '-'} "
        f"token={fields['token_fp']} id={fields['request_id']}"
    )
    return message, fields


def now() -> float:
    return time.perf_counter()
