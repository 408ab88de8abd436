"""Payload encryption: user values sealed before they reach JetStream, opened by key holders.

A codec (:class:`PayloadCodec`, e.g. :class:`AesGcmCodec`) encrypts with its current key and
decrypts with any key it holds, by id. natflow seals every user value (a run's input, a
step's or run's result, a signal's payload, a recorded error's message and traceback, also
a failed attempt's before a retry; a schedule's input) as a JSON envelope in the value's own
place, the key id beside the ciphertext::

    {"$natflow_encrypted":"k2","alg":"AES-256-GCM","data":"<base64 nonce + ciphertext>"}

so history stays valid, typed JSON, rotated keys keep old runs readable (keep the old key in
the set), and tools without keys show "encrypted (key k2)". Sealed errors keep their type and
say ``encrypted (key k2)`` as their message; the real message and traceback are in ``sealed``.

Where it happens: :meth:`HistoryStore.append` seals each event it writes (an already sealed
value is left alone), a client seals inputs and signal payloads before sending them, and
readers open what they read: strictly for replay and results (a missing key raises
:class:`MissingKey`), leniently for display (what cannot be opened stays sealed).
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping
from typing import Any, Final, Protocol, runtime_checkable

import msgspec

from ._errors import ErrorInfo, InvalidInput, NatflowError
from ._undecodable import UNDECODABLE, UnreadableValue
from .events import (
    ChildCompleted,
    ChildFailed,
    Event,
    RunCompleted,
    RunContinued,
    RunFailed,
    RunStarted,
    SignalReceived,
    StepCompleted,
    StepFailed,
    StepRetrying,
)

MARKER: Final = "$natflow_encrypted"
_PREFIX: Final = b'{"' + MARKER.encode() + b'":'
_AAD: Final = b"natflow"
ENV_KEYS: Final = "NATFLOW_CODEC_KEYS"
_KEY_ID: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class MissingKey(NatflowError):
    """A sealed value names a key this process does not hold."""

    def __init__(self, key_id: str, what: str = "a value") -> None:
        super().__init__(
            f"{what} is encrypted with key {key_id!r}, which this process does not hold; add "
            f"it to the codec's keys (AesGcmCodec({{...}}), or {ENV_KEYS} for the CLI)"
        )
        self.key_id = key_id


@runtime_checkable
class PayloadCodec(Protocol):
    """Encrypts with the current key and decrypts with any key it holds, by id.

    natflow wraps the result in its envelope; an implementation only deals in bytes (a KMS,
    an HSM or :class:`AesGcmCodec`).
    """

    def encrypt(self, plaintext: bytes) -> tuple[str, bytes]:
        """``(key id, ciphertext)`` of ``plaintext`` under the current key."""
        ...

    def decrypt(self, key_id: str, ciphertext: bytes) -> bytes:
        """The plaintext; raises :class:`MissingKey` if ``key_id`` is not held."""
        ...


class AesGcmCodec:
    """AES-GCM with 128-, 192- or 256-bit keys by id; encrypts with ``current``.

    Example::

        codec = AesGcmCodec({"k1": old_key, "k2": new_key}, current="k2")
        client = await Client.connect(url, codec=codec)
    """

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if current not in keys:
            raise InvalidInput(f"the current key {current!r} is not among the codec's keys")
        for key_id, key in keys.items():
            if len(key) not in (16, 24, 32):
                raise InvalidInput(f"key {key_id!r} is {len(key)} bytes; AES takes 16, 24 or 32")
        self._ciphers = {key_id: AESGCM(bytes(key)) for key_id, key in keys.items()}
        self.current = current

    @property
    def key_ids(self) -> list[str]:
        return list(self._ciphers)

    def encrypt(self, plaintext: bytes) -> tuple[str, bytes]:
        nonce = os.urandom(12)
        return self.current, nonce + self._ciphers[self.current].encrypt(nonce, plaintext, _AAD)

    def decrypt(self, key_id: str, ciphertext: bytes) -> bytes:
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise MissingKey(key_id)
        return cipher.decrypt(ciphertext[:12], ciphertext[12:], _AAD)

    @classmethod
    def from_env(cls, text: str | None = None) -> AesGcmCodec | None:
        """The codec ``NATFLOW_CODEC_KEYS`` describes (``id:base64key,...``, the first one
        current), or None if it is unset."""
        text = os.environ.get(ENV_KEYS, "") if text is None else text
        if not text.strip():
            return None
        keys: dict[str, bytes] = {}
        # Entries are named by their place, never shown: a malformed one may be a bare key.
        for n, item in enumerate(text.split(","), 1):
            key_id, sep, encoded = item.strip().partition(":")
            try:
                key = base64.b64decode(encoded, validate=True)
            except ValueError:
                key = b""
            if not sep or not key:
                raise InvalidInput(
                    f"{ENV_KEYS} must be a comma-separated list of id:base64key "
                    f"(the first is current); entry {n} is not"
                )
            if not _KEY_ID.fullmatch(key_id):
                raise InvalidInput(
                    f"{ENV_KEYS}: entry {n}'s key id must be letters, digits, '_', '-' or "
                    f"'.' (1 to 64, no spaces)"
                )
            if key_id in keys:  # the later one took over the id: what it sealed, the first
                raise InvalidInput(  # key could not open
                    f"{ENV_KEYS}: key id {key_id!r} is given twice; give each key its own id"
                )
            keys[key_id] = key
        return cls(keys, current=next(iter(keys)))


class _Envelope(msgspec.Struct):
    key: str = msgspec.field(name=MARKER)
    alg: str = "AES-256-GCM"
    data: str = ""


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_encoder = msgspec.json.Encoder()


def is_sealed(data: bytes) -> bool:
    """Whether ``data`` is (meant as) natflow's envelope: the marker first and no field but
    the envelope's (one of those malformed is still refused as a malformed sealed value). A
    user value that merely begins with the marker (``{"$natflow_encrypted": ..., "card":
    ...}``) was taken for one: stored in plaintext, and never opened."""
    if not data.startswith(_PREFIX):
        return False
    try:
        fields = msgspec.json.decode(data)
    except UNDECODABLE:
        return True  # not even JSON after the marker: refused as malformed
    return isinstance(fields, dict) and fields.keys() <= _ENVELOPE_FIELDS


_ENVELOPE_FIELDS: Final = frozenset({MARKER, "alg", "data"})


def sealed_key(value: Any) -> str | None:
    """The key id of a sealed value as a decoded JSON value, else None (for display)."""
    if isinstance(value, dict) and isinstance(value.get(MARKER), str):
        return str(value[MARKER])
    return None


def seal(codec: PayloadCodec, data: bytes) -> bytes:
    """The envelope of JSON ``data`` (left as it is if sealed already)."""
    if is_sealed(data):
        return data
    key_id, ciphertext = codec.encrypt(data)
    alg = "AES-GCM" if isinstance(codec, AesGcmCodec) else type(codec).__name__
    envelope = _Envelope(key=key_id, alg=alg, data=base64.b64encode(ciphertext).decode())
    return _encoder.encode(envelope)


def open_sealed(codec: PayloadCodec | None, data: bytes, what: str = "a value") -> bytes:
    """The JSON inside a sealed ``data`` (``data`` itself if it is not sealed)."""
    if not is_sealed(data):
        return data
    try:
        envelope = _envelope_decoder.decode(data)
    except UNDECODABLE as exc:
        raise UnreadableValue(f"{what} is a malformed sealed value ({exc})") from None
    if codec is None:
        raise MissingKey(envelope.key, what)
    try:
        return codec.decrypt(envelope.key, base64.b64decode(envelope.data))
    except MissingKey:
        raise MissingKey(envelope.key, what) from None
    except Exception as exc:  # a wrong key under a known id, or tampered data
        raise WrongKey(
            f"{what} could not be decrypted with key {envelope.key!r} (a key of that id that "
            f"is not the one it was sealed with, or altered data)"
        ) from exc


class WrongKey(UnreadableValue):
    """A sealed value did not decrypt with the key its id names here: most often a key
    given under the wrong id, which a fix of the configuration cures, so a run meeting one
    is handed back as for a missing key (it was parked for good)."""


class _SealedError(msgspec.Struct):
    message: str
    traceback: str = ""


def seal_error(codec: PayloadCodec, error: ErrorInfo) -> ErrorInfo:
    if error.sealed:
        return error
    sealed = seal(codec, _encoder.encode(_SealedError(error.message, error.traceback)))
    key_id = _envelope_decoder.decode(sealed).key
    return ErrorInfo(type=error.type, message=f"encrypted (key {key_id})", sealed=sealed.decode())


def open_error(codec: PayloadCodec | None, error: ErrorInfo, what: str) -> ErrorInfo:
    if not error.sealed:
        return error
    inner = msgspec.json.decode(open_sealed(codec, error.sealed.encode(), what), type=_SealedError)
    return ErrorInfo(type=error.type, message=inner.message, traceback=inner.traceback)


def _open_outcome(codec: PayloadCodec | None, data: bytes, what: str) -> bytes:
    """An ``on_complete`` run's input (a ``RunOutcome``) with the closed run's result and
    error opened: the engine, which holds no key, put them in as they were sealed."""
    if MARKER.encode() not in data:
        return data
    outcome = msgspec.json.decode(data)
    if not isinstance(outcome, dict):
        return data
    result = outcome.get("result")
    if result is not None and sealed_key(result) is not None:
        outcome["result"] = msgspec.json.decode(open_sealed(codec, _encoder.encode(result), what))
    error = outcome.get("error")
    if isinstance(error, dict) and error.get("sealed"):
        info = msgspec.convert(error, ErrorInfo)
        outcome["error"] = msgspec.to_builtins(open_error(codec, info, what))
    return _encoder.encode(outcome)


def _raw(data: msgspec.Raw) -> bytes:
    return bytes(data)


def seal_event(codec: PayloadCodec | None, event: Event) -> Event:
    """``event`` with its user values sealed (itself without a codec or such values)."""
    if codec is None:
        return event
    if isinstance(event, RunContinued) and event.signals:  # signals it carries, sealed too
        signals = [seal_event(codec, signal) for signal in event.signals]
        event = msgspec.structs.replace(event, signals=signals)
    if isinstance(event, RunStarted):
        return msgspec.structs.replace(event, input=msgspec.Raw(seal(codec, _raw(event.input))))
    if isinstance(event, RunCompleted) and event.last_step is not None:  # carried: sealed too
        last_step = seal_event(codec, event.last_step)
        assert isinstance(last_step, StepCompleted)
        event = msgspec.structs.replace(event, last_step=last_step)
    # A child's outcome too: the worker opens it (to hand the result to the workflow), and
    # it went into the parent's history, and the value store, in plaintext.
    if isinstance(event, StepCompleted | RunCompleted | ChildCompleted):
        return msgspec.structs.replace(event, result=msgspec.Raw(seal(codec, _raw(event.result))))
    if isinstance(event, ChildFailed) and event.error is not None:
        return msgspec.structs.replace(event, error=seal_error(codec, event.error))
    if isinstance(event, SignalReceived):
        return msgspec.structs.replace(event, payload=msgspec.Raw(seal(codec, _raw(event.payload))))
    if isinstance(event, StepFailed | StepRetrying | RunFailed):
        return msgspec.structs.replace(event, error=seal_error(codec, event.error))
    return event


def open_event(codec: PayloadCodec | None, event: Event, run_id: str) -> Event:
    """``event`` with its sealed values opened; :class:`MissingKey` if a key is not held."""
    what = f"run {run_id!r}: {type(event).__name__}"
    if isinstance(event, RunContinued) and event.signals:  # signals it carries, opened too
        signals = [open_event(codec, signal, run_id) for signal in event.signals]
        event = msgspec.structs.replace(event, signals=signals)
    if isinstance(event, RunStarted) and is_sealed(_raw(event.input)):
        opened = open_sealed(codec, _raw(event.input), f"the input of run {run_id!r}")
        event = msgspec.structs.replace(event, input=msgspec.Raw(opened))
        if event.on_complete_of is None:
            return event
    if isinstance(event, RunStarted) and event.on_complete_of is not None:
        opened = _open_outcome(codec, _raw(event.input), f"the input of run {run_id!r}")
        return msgspec.structs.replace(event, input=msgspec.Raw(opened))
    if isinstance(event, StepCompleted | RunCompleted | ChildCompleted) and is_sealed(
        _raw(event.result)
    ):
        opened = open_sealed(codec, _raw(event.result), f"a result in {what}")
        return msgspec.structs.replace(event, result=msgspec.Raw(opened))
    if isinstance(event, ChildFailed) and event.error is not None and event.error.sealed:
        return msgspec.structs.replace(event, error=open_error(codec, event.error, what))
    if isinstance(event, SignalReceived) and is_sealed(_raw(event.payload)):
        opened = open_sealed(codec, _raw(event.payload), f"signal {event.name!r} of {what}")
        return msgspec.structs.replace(event, payload=msgspec.Raw(opened))
    if isinstance(event, StepFailed | StepRetrying | RunFailed) and event.error.sealed:
        return msgspec.structs.replace(event, error=open_error(codec, event.error, what))
    return event


def open_events(
    codec: PayloadCodec | None, events: list[Event], run_id: str, *, strict: bool = True
) -> list[Event]:
    """Every event opened. Not ``strict``: what cannot be opened stays sealed (for display)."""
    if strict:
        return [open_event(codec, e, run_id) for e in events]
    opened: list[Event] = []
    for event in events:
        try:
            opened.append(open_event(codec, event, run_id))
        except (MissingKey, UnreadableValue):  # a wrong key too: shown sealed, not a failure
            opened.append(event)
    return opened
