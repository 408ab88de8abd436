"""Regenerate what in this folder comes from natflow's roles: permissions.conf and the
queue-limited worker's permissions in nats.conf (tests/test_auth_roles.py checks both).

Run it after changing a role in ``natflow_engine._auth``: ``python ops/auth/regenerate.py``.
"""

from __future__ import annotations

from pathlib import Path

from natflow_engine._auth import permissions_conf, role_permissions

HERE = Path(__file__).parent
MARK = '{ user: billing_worker, password: "billing-secret", permissions: '


def _replace_block(text: str, start: int, block: str) -> str:
    """Replace the brace-balanced block that begins at ``start`` with ``block``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[:start] + block + text[i + 1 :]
    raise SystemExit("nats.conf: the billing worker's permissions block is not closed")


def main() -> None:
    (HERE / "permissions.conf").write_text(permissions_conf())
    conf = (HERE / "nats.conf").read_text()
    at = conf.index(MARK) + len(MARK)
    billing = role_permissions("worker", queues=["billing"], workflows=["billing_flow"])
    # Indented as the user entry it sits in, so the generated part reads like the rest.
    block = billing.to_conf().replace("\n", "\n    ")
    (HERE / "nats.conf").write_text(_replace_block(conf, at, block))


if __name__ == "__main__":
    main()
