"""Logging set-up: human text or one JSON object per line, plus the access log line for each request.

In JSON mode *every* line the proxy writes (banner, warnings, access log) is a JSON object, so that log
shippers can parse all of it. Secrets never reach a log call: only fingerprints do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, Final

ACCESS_LOGGER: Final = "odata_auth_proxy.access"
ROOT_LOGGER: Final = "odata_auth_proxy"


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


class ProxyLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``setup_logging`` installs: the access log may write past it, in batches, to its stream."""

    def __init__(self, stream: Any, log_format: str) -> None:
        super().__init__(stream)
        self.log_format = log_format


def setup_logging(log_format: str, verbose: bool, stream: Any = None) -> None:
    """Route the proxy's and aiohttp's loggers to stderr in the chosen format."""
    handler = ProxyLogHandler(stream or sys.stderr, log_format)
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


_TWO_DIGITS: Final = tuple(f"{n:02d}" for n in range(100))  # the hundredths of a millisecond, without formatting each
FLUSH_DELAY: Final = 0.05  # an access log line is written at most this long after its request ended
FLUSH_LINES: Final = 256  # or when this many lines wait


class AccessLog:
    """Access log lines, cheap enough for every request: formatted directly and written in batches.

    ``logging.info`` costs about 8.5 µs a line (record, locks, formatter) and a JSON formatter 12 µs, a large
    share of a proxied request's budget. When the proxy's own handler (``setup_logging``) is the only one that
    would see the line, it is formatted here in that handler's format, appended to a buffer and written at
    most ``FLUSH_DELAY`` later (or when ``FLUSH_LINES`` wait). Anywhere else (another handler attached, e.g.
    by an embedding program or a test's log capture) the line goes through ``logging`` as usual, so nothing
    that listens misses a line. Which of the two applies is worked out once a second (walking the logger tree
    costs more than formatting the line) and checked per line only against the root's handler list, which is
    where a log capture or an embedding program adds its handler.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)
        self._lines: list[str] = []
        self._flush_handle: Any = None
        self._second = -1
        self._stamp = ""
        self._info_prefix = ""
        self._direct: ProxyLogHandler | None = None  # for INFO lines, worked out once a second

    def _direct_handler(self, level: int) -> ProxyLogHandler | None:
        """The proxy's own handler when it alone would see this line, else None (go through ``logging``)."""
        logger: logging.Logger | None = self.logger
        if not self.logger.isEnabledFor(level):
            return None
        root = logging.getLogger()
        while logger is not None and logger is not root:
            if logger.handlers or not logger.propagate:
                return None
            logger = logger.parent
        if len(root.handlers) != 1:
            return None
        handler = root.handlers[0]
        if type(handler) is not ProxyLogHandler or handler.level > level:
            return None
        return handler

    def request(
        self,
        level: int,
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
        error: str | None,
        worker: int | None = None,
    ) -> None:
        """One request's line: ``key=value`` facts, the same message in text and JSON mode, where (and for other
        handlers, as the record's ``fields``) the facts are also keys of their own. The duration shows in
        milliseconds with two decimals: ``round`` and a float's repr cost five times as much."""
        now = time.time()
        if int(now) != self._second:
            self._new_second(now)
        # Every field made a str first, no format spec: compiled (mypyc), such an f-string is one concatenation,
        # where ``{x:.2f}`` or a field of another type costs a ``str.format`` call each (10 per line).
        # (str() outside the f-string: ruff would make ``{str(x)}`` a ``{x!s}``, which mypyc formats the slow way)
        hundredths = int(duration * 100_000 + 0.5)  # of a millisecond
        took = str(hundredths // 100) + "." + _TWO_DIGITS[hundredths % 100]
        answered, sent = str(status), str(bytes_out)
        upstream = str(upstream_status) if upstream_status is not None else "-"
        message = (
            f'{client or "-"} "{method} {target}" {answered} {sent}B {took}ms '
            f"route={route or '-'} upstream={upstream} token={token_fp or '-'} id={request_id or '-'}"
        )
        if error:  # why the proxy answered itself, or cut the exchange (drain_timeout, client_disconnected, ...)
            message += " error=" + error
        if worker is not None:  # only with several worker processes
            message += " worker=" + str(worker)
        # the proxy's own handler when it alone would see the line (for INFO as worked out this second)
        handler = self._direct if level == logging.INFO else self._direct_handler(level)
        roots = logging.root.handlers
        if handler is not None and len(roots) == 1 and roots[0] is handler:
            if handler.log_format != "json":
                prefix = (
                    self._info_prefix if level == logging.INFO else f"{self._stamp} {logging.getLevelName(level):<7} "
                )
                self._append(prefix + message)
                return
            entry: dict[str, Any] = {
                "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
                "level": logging.getLevelName(level).lower(),
                "logger": self.logger.name,
                "message": message,
            }
        elif self.logger.isEnabledFor(level):
            entry = {}
        else:
            return
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
        if error:
            fields["error"] = error
        if worker is not None:
            fields["worker"] = worker
        if not entry:
            self.logger.log(level, message, extra={"fields": fields})
            return
        entry.update(fields)
        self._append(json.dumps(entry, ensure_ascii=False, default=str))

    def _new_second(self, now: float) -> None:
        """Once a second: the text time stamp (to the second), and whether lines may bypass ``logging``."""
        self._second = int(now)
        self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
        self._info_prefix = f"{self._stamp} INFO    "  # as TextFormatter writes it
        self._direct = self._direct_handler(logging.INFO)

    def _append(self, line: str) -> None:
        self._lines.append(line)
        if len(self._lines) >= FLUSH_LINES:
            self.flush()
        elif self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._flush_handle = loop.call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        handler = logging.getLogger().handlers[0] if logging.getLogger().handlers else None
        if not isinstance(handler, ProxyLogHandler):
            for line in lines:
                sys.stderr.write(line + "\n")
            return
        handler.acquire()
        try:
            handler.stream.write("\n".join(lines) + "\n")
            handler.flush()
        except (OSError, ValueError):
            pass  # stderr closed: nothing sensible left to do with a log line
        finally:
            handler.release()


def now() -> float:
    return time.perf_counter()
