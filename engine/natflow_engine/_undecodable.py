"""What decoding bytes from outside raises when they are no message natflow can read.

msgspec raises ``msgspec.DecodeError`` (or its ``ValidationError``) for JSON that is
malformed or of the wrong shape, but ``UnicodeDecodeError`` for a JSON string holding bytes
that are not UTF-8 (msgspec 0.22). Anyone may publish such bytes on a subject natflow reads
(a signal, an event, a start request, a KV entry), and a process that let the second kind
through died of one message, or retried it forever. So whatever sets aside what it cannot
decode catches both, as one: ``except UNDECODABLE``. JSON nested deeper than msgspec
goes (a body of 200,000 ``[``) raises ``RecursionError``: one such signal jammed the
signal intake, retried with its batch every second for good, so it is in the set too.

:class:`UnreadableValue` is the same for a value that decodes but cannot be opened, for
good: a reference to a stored value that is malformed or names none, a sealed envelope that
is malformed or does not decrypt with the key it names. A signal's payload is such a value
(anyone may send one that looks like natflow's): it is rejected, not retried.
"""

from __future__ import annotations

from typing import Final

import msgspec

from ._errors import NatflowError

UNDECODABLE: Final = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


class UnreadableValue(NatflowError):
    """A value's reference or sealed envelope that can never be opened (see above)."""
