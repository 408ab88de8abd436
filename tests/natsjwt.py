"""NATS decentralized auth made at test time: an operator, accounts and user creds files.

What ``nsc`` would make, by hand: NKEYs from ``nkeys``, JWTs signed with them (header
``{"typ":"JWT","alg":"ed25519-nkey"}``, claims with ``nats`` of type operator, account or
user), a creds file holding a user's JWT and seed, and a server config with a memory resolver.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nkeys


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@dataclass(frozen=True)
class Key:
    seed: bytes
    public: str

    @classmethod
    def new(cls, prefix: int) -> Key:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        return cls(seed, nkeys.from_seed(bytearray(seed)).public_key.decode())

    def sign(self, data: bytes) -> bytes:
        return bytes(nkeys.from_seed(bytearray(self.seed)).sign(data))


def encode_jwt(issuer: Key, subject: str, name: str, nats: dict[str, Any]) -> str:
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public,
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    claims["jti"] = (
        base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest())
        .decode()
        .rstrip("=")
    )
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = _b64(issuer.sign(f"{header}.{body}".encode()))
    return f"{header}.{body}.{signature}"


_UNLIMITED = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}
_JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


@dataclass
class Account:
    name: str
    key: Key
    jwt: str
    users: dict[str, Path] = field(default_factory=dict)


@dataclass
class Operator:
    """An operator with a system account; :meth:`account` and :meth:`user` add more."""

    folder: Path
    key: Key = field(default_factory=lambda: Key.new(nkeys.PREFIX_BYTE_OPERATOR))
    accounts: dict[str, Account] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.jwt = encode_jwt(self.key, self.key.public, "natflow-test", {"type": "operator"})
        self.account("SYS", jetstream=False)

    def account(self, name: str, *, jetstream: bool = True) -> Account:
        key = Key.new(nkeys.PREFIX_BYTE_ACCOUNT)
        limits = {**_UNLIMITED, **(_JETSTREAM if jetstream else {})}
        jwt = encode_jwt(self.key, key.public, name, {"type": "account", "limits": limits})
        self.accounts[name] = Account(name, key, jwt)
        return self.accounts[name]

    def user(self, account: str, name: str, permissions: dict[str, Any] | None = None) -> Path:
        """A creds file for a new user of ``account`` (permissions as nats.conf has them)."""
        owner = self.accounts[account]
        key = Key.new(nkeys.PREFIX_BYTE_USER)
        claims: dict[str, Any] = {"type": "user", "subs": -1, "data": -1, "payload": -1}
        if permissions:
            claims["pub"] = permissions.get("publish", {})
            claims["sub"] = permissions.get("subscribe", {})
            if permissions.get("allow_responses"):
                claims["resp"] = {"max": 1, "ttl": 0}
        jwt = encode_jwt(owner.key, key.public, name, claims)
        path = self.folder / f"{name}.creds"
        path.write_text(
            f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{key.seed.decode()}\n"
            f"------END USER NKEY SEED------\n"
        )
        owner.users[name] = path
        return path

    def server_config(self, store: Path, *, max_control_line: int = 65536) -> Path:
        preload = "\n".join(f"  {a.key.public}: {a.jwt}" for a in self.accounts.values())
        path = self.folder / "server.conf"
        path.write_text(
            f"listen: 127.0.0.1:-1\n"
            # The engine's JWT lists ~290 subjects: its CONNECT exceeds the default 4 KiB,
            # and 16 KiB with a JetStream domain (docs/security.md).
            f"max_control_line: {max_control_line}\n"
            f'jetstream {{ store_dir: "{store}" }}\n'
            f"operator: {self.jwt}\n"
            f"system_account: {self.accounts['SYS'].key.public}\n"
            f"resolver: MEMORY\n"
            f"resolver_preload: {{\n{preload}\n}}\n"
        )
        return path
