"""Credentials and TLS for the connection: what nats-py is given, checked before it is tried.

Files that cannot be read, a creds file that is not one (nats-py would loop forever on it) or
whose JWT has expired (the server only says "Authorization Violation") are refused here, each
naming its field. No secret leaves this module in a message.
"""

from __future__ import annotations

import base64
import binascii
import json
import ssl
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import nkeys

from ..config import NATSConfig

__all__ = ["Refused", "credentials", "security_options"]


class Refused(Exception):
    """A credential or TLS setting that cannot be used; the message names the field."""


def security_options(config: NATSConfig) -> tuple[list[str], dict[str, Any]]:
    """The servers without user info, and nats-py's credential and TLS options.

    The user, password or token in a URL are passed as options, so that the `user`,
    `password` and `token` fields win over them, and no URL nats-py keeps holds a secret.
    """
    servers: list[str] = []
    user = password = token = ""
    for server in config.servers:
        parts = urlsplit(server)
        userinfo, at, hostport = parts.netloc.rpartition("@")
        if at and not (user or password or token):
            name, colon, secret = userinfo.partition(":")
            if colon:
                user, password = unquote(name), unquote(secret)
            else:
                token = unquote(name)
        servers.append(parts._replace(netloc=hostport).geturl())
    user = config.user or user
    password = config.password or password
    token = config.token or token
    options: dict[str, Any] = {}
    if user or password:
        options.update(user=user, password=password)
    if token:
        options["token"] = token
    if config.nkey_seed_file:
        options["nkeys_seed_str"] = _nkey_seed(config.nkey_seed_file)
    if config.creds_file:
        _check_creds(config.creds_file)
        options["user_credentials"] = config.creds_file
    if config.uses_tls:
        options["tls"] = _tls_context(config)
        options["tls_handshake_first"] = config.tls_handshake_first
    return servers, options


def _read(field: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a text file"
        raise Refused(f"{field}: cannot read {path}: {reason}") from None


def _nkey_seed(path: str) -> str:
    seed = _read("nkey_seed_file", path).strip()
    try:
        nkeys.from_seed(bytearray(seed.encode())).wipe()
    except Exception:  # nkeys raises its own errors, and others, for any bad input
        raise Refused(f"nkey_seed_file: {path} does not hold an nkey seed (S...)") from None
    return seed


_JWT_BEGIN = "-----BEGIN NATS USER JWT-----"
_SEED_BEGIN = "-----BEGIN USER NKEY SEED-----"


def _check_creds(path: str) -> None:
    """Refuse a creds file that cannot be read, is not one, or whose JWT has expired.

    The server only says "Authorization Violation" for an expired JWT, so its `exp` claim is
    read here. (nats-py would also loop forever on a file without the JWT marker.)
    """
    text = _read("creds_file", path)
    lines = [line.strip() for line in text.splitlines()]
    if _JWT_BEGIN not in lines or _SEED_BEGIN not in lines:
        raise Refused(f"creds_file: {path} is not a NATS .creds file (no user JWT and seed)")
    jwt = next((line for line in lines[lines.index(_JWT_BEGIN) + 1 :] if line), "")
    try:
        payload = jwt.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        expires = claims.get("exp") if isinstance(claims, dict) else None
    except (IndexError, ValueError, binascii.Error):
        raise Refused(f"creds_file: the user JWT in {path} cannot be decoded") from None
    if (
        isinstance(expires, int | float)
        and not isinstance(expires, bool)
        and expires <= time.time()
    ):
        when = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        raise Refused(f"creds_file: the user JWT in {path} expired at {when}")


def _tls_context(config: NATSConfig) -> ssl.SSLContext:
    """A client TLS context: `tls_ca_file` (else the system's trust) and a client cert."""
    for field in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        if getattr(config, field):
            _read(field, getattr(config, field))
    try:
        context = ssl.create_default_context(cafile=config.tls_ca_file or None)
    except ssl.SSLError:
        raise Refused(f"tls_ca_file: {config.tls_ca_file} holds no PEM certificate") from None
    if config.tls_cert_file:
        try:
            context.load_cert_chain(config.tls_cert_file, config.tls_key_file or None)
        except ssl.SSLError:
            raise Refused(
                f"tls_cert_file: {config.tls_cert_file} and its key "
                f"({config.tls_key_file or 'in the same file'}) are not a PEM certificate and "
                "its private key"
            ) from None
    return context


def credentials(config: NATSConfig, options: dict[str, Any]) -> str:
    """Which credentials were given, without any secret."""
    if config.creds_file:
        return f"the creds file {config.creds_file}"
    if config.nkey_seed_file:
        return f"the nkey in {config.nkey_seed_file}"
    if "user" in options:
        return f"user {options['user']!r} and its password"
    if "token" in options:
        return "the token"
    return "a client without credentials"
