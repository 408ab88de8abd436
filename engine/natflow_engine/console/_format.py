"""Template filters: times with their zone and a relative form, durations, JSON."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from markupsafe import Markup, escape

from .._human import duration as human_duration
from .._sealing import sealed_key
from .._undecodable import UNDECODABLE
from .._values import value_ref

_pretty_encoder = msgspec.json.Encoder(order="deterministic")


def relative(when: datetime, now: datetime | None = None) -> str:
    """ "12 s ago", "in 3 min": what the page says beside each time (the script keeps it fresh)."""
    delta = ((now or datetime.now(UTC)) - when).total_seconds()
    ahead, seconds = delta < 0, abs(delta)
    if seconds < 1:
        text = "just now" if not ahead else "in a moment"
        return text
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            amount = f"{int(seconds // size)} {unit}"
            return f"in {amount}" if ahead else f"{amount} ago"
    return "just now"


def when(value: datetime | None, *, date: bool = True) -> Markup:
    """A ``<time>`` with the UTC time, its zone and the relative time; empty for None."""
    if value is None:
        return Markup('<span class="muted">—</span>')
    utc = value.astimezone(UTC)
    shown = utc.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S")
    return Markup(
        '<time datetime="{iso}" title="{iso}"><span class="abs">{shown}</span> '
        '<span class="zone">UTC</span> <span class="rel">{rel}</span></time>'
    ).format(iso=utc.isoformat(), shown=shown, rel=relative(utc))


def duration(seconds: float | None) -> str:
    """A duration the way people say it (350 ms, 2.4 s, 3 min 2 s), as the CLI says it."""
    return "—" if seconds is None else human_duration(seconds)


def span(start: datetime, end: datetime | None) -> str:
    """How long from ``start`` to ``end`` (or until now)."""
    return duration(((end or datetime.now(UTC)) - start).total_seconds())


def pretty_json(value: Any) -> str:
    """Indented JSON of a decoded value (or of raw JSON bytes); a value sealed with a key the
    console does not hold is "encrypted (key k2)", a large value stored by reference is
    named with its size."""
    try:
        if isinstance(value, msgspec.Raw):
            value = msgspec.json.decode(value)
        key_id = sealed_key(value)
        if key_id is not None:
            return f"encrypted (key {key_id})"
        ref = value_ref(value)
        if ref is not None:  # a large value: named, not pulled into the page
            return f"a stored value of {ref.size:,} bytes (natflow_values, sha256 {ref.digest})"
        data = _pretty_encoder.encode(value)
    except (TypeError, *UNDECODABLE, msgspec.EncodeError):
        return str(value)
    return msgspec.json.format(data, indent=2).decode()


def payload_text(text: str) -> str:
    """A stored payload's JSON text as it is, or "encrypted (key k2)" when it is sealed."""
    try:
        key_id = sealed_key(msgspec.json.decode(text))
    except UNDECODABLE:
        return text
    return text if key_id is None else f"encrypted (key {key_id})"


def event_json(event: Any) -> str:
    """One history event as the JSON stored in the stream, indented."""
    return msgspec.json.format(msgspec.json.encode(event), indent=2).decode()


def event_type(event: Any) -> str:
    return str(event.__struct_config__.tag)


def badge(status: str) -> Markup:
    return Markup('<span class="badge s-{s}">{s}</span>').format(s=escape(status))


FILTERS = {
    "when": when,
    "duration": duration,
    "span": span,
    "pretty_json": pretty_json,
    "payload_text": payload_text,
    "event_json": event_json,
    "event_type": event_type,
    "badge": badge,
    "relative": relative,
}
