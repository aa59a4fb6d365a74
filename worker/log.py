"""One structlog set-up for the whole process, with the API key redacted by a processor.

Events are namespaced (``target.patched``, ``run.finished``) key-value pairs. JSON goes to
stderr when it is not a terminal, a console rendering otherwise. ``redact`` registers secrets;
every string value of every event is scrubbed of them before rendering, whatever the call site
put there (an exception message, a URL, a header dump), and its control characters (an image
name's ESC or U+202E) are shown escaped.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from worker.safety import printable

_SECRETS: set[str] = set()
_MASK = "***"


def redact(secret: str | None) -> None:
    """Never let ``secret`` reach a log line (short strings are ignored: they would mask noise)."""
    if secret and len(secret) >= 4:
        _SECRETS.add(secret)


def scrub(text: str) -> str:
    """``text`` with every registered secret masked."""
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, _MASK)
    return text


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return printable(scrub(value), newlines=True)
    if isinstance(value, dict):
        return {k: _scrub_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_value(v) for v in value]
    if isinstance(value, BaseException):
        return printable(scrub(f"{type(value).__name__}: {value}"), newlines=True)
    return value


def _redact_processor(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        event[key] = _scrub_value(value)
    return event


def _scrub_rendered(_logger: Any, _name: str, rendered: Any) -> Any:
    # A last pass over the rendered line: catches what formatters (tracebacks) added.
    return scrub(rendered) if isinstance(rendered, str) and _SECRETS else rendered


def configure(
    fmt: str | None = None, *, level: str = "info", stream: TextIO | None = None
) -> None:
    """Set up structlog. ``fmt``: ``json`` or ``console``; None picks by whether stderr is a tty."""
    stream = stream or sys.stderr
    if fmt is None:
        fmt = "console" if stream.isatty() else "json"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_processor,
            renderer,
            _scrub_rendered,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
