"""The client-side check of a message's size, headers included (the server closes the
connection of a client that sends more than its max payload)."""

from __future__ import annotations

import pytest
from natflow import Client
from natflow_engine._connection import PayloadTooLarge, wire_header_size


async def test_headers_count_toward_the_max_payload(client: Client) -> None:
    conn = client.connection
    limit = conn.max_payload
    headers = {"Nats-Msg-Id": "é" * 1000, "Nats-Expected-Last-Subject-Sequence": "7"}
    exact = wire_header_size(headers)
    assert exact > len("é" * 1000) * 2  # two bytes a character: counted as bytes
    conn.check_wire_size("s", b"x" * (limit - exact), headers)  # exactly at the limit
    with pytest.raises(PayloadTooLarge):
        conn.check_wire_size("s", b"x" * (limit - exact + 1), headers)
    conn.check_wire_size("s", b"x" * 100, {"Nats-Msg-Id": "a"})
    with pytest.raises(PayloadTooLarge):
        conn.check_wire_size("s", b"x" * limit, {"Nats-Msg-Id": "a"})
