"""What natflow says when a connection cannot be made, and how it keeps secrets out of it.

nats-py reports a refused credential, an untrusted certificate or a missing creds file as "no
servers", a timeout or a bare TypeError; these turn what it saw into an error that names the
cause and the option that fixes it. Every URL and nats-py message natflow prints or logs
loses its password or token here first.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import nkeys

from ._errors import ConnectionRefused, InvalidInput


def redact_url(url: str) -> str:
    """``url`` without its secret: ``nats://user:***@host``, ``nats://***@host`` for a token.

    Every URL natflow prints or logs goes through here; a list (``a,b``) is redacted per URL.
    """
    if "," in url:
        return ",".join(redact_url(part.strip()) for part in url.split(","))
    if "://" not in url:  # nats-py takes ``user:pass@host:4222`` too (as nats://...)
        return redact_url(f"nats://{url}").removeprefix("nats://")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if "@" not in parts.netloc:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon else "***"  # a lone userinfo is a token
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{shown}@{host}"))


_URL_SECRET = re.compile(r"(\w+://)([^@/\s]+)@")


def redact_text(text: str) -> str:
    """Any URL inside a message (nats-py quotes the server it tried) loses its secret."""
    return _URL_SECRET.sub(lambda m: redact_url(m.group(0) + "x")[:-1], text)


def refused_credentials(error: BaseException) -> bool:
    text = str(error).lower()
    return "authorization violation" in text or "authentication" in text


def check_creds_file(path: str) -> int:
    """A creds file must exist and hold a user JWT and an NKEY seed; nats-py would report a
    missing one as "no servers" and a malformed one as a bare TypeError. Its content (a
    secret) is never shown. Returns the file's size: the JWT in it travels in the CONNECT
    line, which a server limits (``control_line_refusal``)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InvalidInput(
            f"cannot read the creds file {path!r} ({exc.strerror}); pass the path of a NATS "
            f"user creds file (--creds, NATFLOW_CREDS)"
        ) from None
    for marker in ("BEGIN NATS USER JWT", "BEGIN USER NKEY SEED"):
        if marker not in text:
            raise InvalidInput(
                f"{path!r} is not a NATS user creds file: it has no '-----{marker}-----' "
                f"block (make one with `nsc generate creds`, or from your operator's tooling)"
            )
    return len(text)


def check_nkey_file(path: str) -> None:
    """An nkey seed file must exist and hold a user seed; nats-py reports a missing one as
    "no servers" and a malformed one with a traceback. The seed (a secret) is never shown."""
    try:
        seed = Path(path).read_bytes().strip()
    except OSError as exc:
        raise InvalidInput(
            f"cannot read the nkey seed file {path!r} ({exc.strerror}); pass the path of a "
            f"file holding a user nkey seed (--nkey)"
        ) from None
    try:
        nkeys.from_seed(seed)
    except Exception:  # nkeys raises its own errors (ErrInvalidSeed, ...) and binascii's
        raise InvalidInput(
            f"{path!r} holds no nkey seed (one line starting 'SU', as `nk -gen user` writes)"
        ) from None


# nats-server's default max_control_line: a CONNECT line longer than this is refused.
_DEFAULT_CONTROL_LINE: Final = 4096


def control_line_refusal(
    shown: str, errors: Sequence[BaseException], creds_size: int = 0
) -> ConnectionRefused | None:
    """The server closed the connection because the CONNECT line was too long (a JWT that
    carries a role's permissions), or None. nats-py reports it as "no servers": the server's
    ``-ERR 'maximum control line exceeded'`` reaches it only when it reads before the reset
    of the socket it is still writing to; a reset while sending a JWT larger than the
    default limit says the same, less surely."""
    said = any("maximum control line exceeded" in str(error).lower() for error in errors)
    reset = any(isinstance(error, ConnectionResetError) for error in errors)
    if not (said or (reset and creds_size > _DEFAULT_CONTROL_LINE)):
        return None
    why = (
        "its CONNECT line is longer than the server's max_control_line"
        if said
        else f"it reset the connection as natflow sent a {creds_size}-byte creds file, most "
        f"likely because the CONNECT line is longer than the server's max_control_line"
    )
    return ConnectionRefused(
        f"the NATS server at {shown} refused the connection: {why} (a JWT's permissions "
        f"travel in it; the engine's take about 17 KiB); set `max_control_line: 65536` in "
        f"the server's configuration (docs/security.md)"
    )


def tls_refusal(
    shown: str, errors: list[BaseException], *, uses_tls: bool = False
) -> ConnectionRefused | None:
    """What a failed TLS handshake among ``errors`` means for the user, or None if none did."""
    for error in errors:
        if isinstance(error, ssl.SSLCertVerificationError):
            return ConnectionRefused(
                f"the TLS certificate of the NATS server at {shown} is not trusted "
                f"({error.verify_message}); pass the CA that signed it with --tls-ca "
                f"(NATFLOW_TLS_CA, or an ssl.SSLContext as tls=)"
            )
    for error in errors:
        if isinstance(error, ssl.SSLError):
            reason = error.reason or str(error)
            return ConnectionRefused(
                f"the NATS server at {shown} refused the TLS handshake ({reason}); it wants "
                f"a client certificate signed by a CA it trusts: pass --tls-cert and --tls-key "
                f"(NATFLOW_TLS_CERT, NATFLOW_TLS_KEY)"
            )
    # With TLS 1.3 the server checks the client's certificate after the client's side of the
    # handshake is done: its refusal may reach the client only as a closed connection.
    closed = (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError)
    if uses_tls and any(isinstance(e, closed) or "eof" in str(e).lower() for e in errors):
        return ConnectionRefused(
            f"the NATS server at {shown} refused the TLS handshake (it closed the connection "
            f"during it); it most likely wants a client certificate signed by a CA it trusts: "
            f"pass --tls-cert and --tls-key (NATFLOW_TLS_CERT, NATFLOW_TLS_KEY)"
        )
    return None
