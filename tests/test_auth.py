"""Authentication and TLS: user and password, token, nkey, creds files, TLS and mutual TLS.

Each server is a real `nats-server` configured for one method (`NATSServer(config=...)`), with
certificates made by trustme. Every method is shown working (a bus connects and publishes) and
failing clearly: `ConnectionFailed` naming the server and the cause, one line and exit code 4
through the CLI, and never the secret.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nkeys
import pytest
import trustme
from click.testing import CliRunner

from gdc_worker import ConfigError, ConnectionFailed, NATSConfig, NATSEventBus
from gdc_worker.cli import main
from gdc_worker.server import NATSServer
from gdc_worker.testing import isolated_config

from .support import node_up

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
GDC_WORKER = str(Path(sysconfig.get_path("scripts")) / "gdc-worker")
PASSWORD = "pw-s3cr3t-alice"
TOKEN = "tok-s3cr3t-123"


def _new_user_seed() -> bytes:
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed


def _public_key(seed: bytes) -> str:
    key: bytes = nkeys.from_seed(bytearray(seed)).public_key
    return key.decode()


@pytest.fixture(scope="module")
def password_server() -> Iterator[NATSServer]:
    config = f'authorization {{ user: alice, password: "{PASSWORD}" }}\n'
    with NATSServer(config=config) as server:
        yield server


@pytest.fixture(scope="module")
def token_server() -> Iterator[NATSServer]:
    with NATSServer(config=f'authorization {{ token: "{TOKEN}" }}\n') as server:
        yield server


@dataclass
class NkeyServer:
    server: NATSServer
    seed_file: Path


@pytest.fixture(scope="module")
def nkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NkeyServer]:
    seed = _new_user_seed()
    seed_file = tmp_path_factory.mktemp("nkey") / "user.nk"
    seed_file.write_bytes(seed + b"\n")
    config = f"authorization {{ users = [ {{ nkey: {_public_key(seed)} }} ] }}\n"
    with NATSServer(config=config) as server:
        yield NkeyServer(server, seed_file)


@dataclass
class Certificates:
    ca: Path
    server: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    where = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    files = Certificates(
        where / "ca.pem", where / "server.pem", where / "client.pem", where / "client.key"
    )
    ca.cert_pem.write_to_path(files.ca)
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
        files.server
    )
    client = ca.issue_cert("worker@example.com")
    client.cert_chain_pems[0].write_to_path(files.client_cert)
    client.private_key_pem.write_to_path(files.client_key)
    return files


@pytest.fixture(scope="module")
def tls_server(certs: Certificates) -> Iterator[NATSServer]:
    config = f'tls {{ cert_file: "{certs.server}", key_file: "{certs.server}" }}\n'
    with NATSServer(config=config) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(certs: Certificates) -> Iterator[NATSServer]:
    config = (
        f'tls {{ cert_file: "{certs.server}", key_file: "{certs.server}", '
        f'ca_file: "{certs.ca}", verify: true }}\n'
    )
    with NATSServer(config=config) as server:
        yield server


def tls_url(server: NATSServer) -> str:
    return f"tls://127.0.0.1:{server.port}"


async def connects_and_publishes(config: NATSConfig) -> None:
    async with await NATSEventBus.connect(config) as bus:
        await bus.publish_event(node_up())
        assert bus.connected


async def refused(config: NATSConfig) -> str:
    with pytest.raises(ConnectionFailed) as failure:
        await NATSEventBus.connect(config)
    message = str(failure.value)
    assert "\n" not in message
    for secret in (PASSWORD, TOKEN, config.password, config.token):
        assert not secret or secret not in message
    return message


# -- user and password ---------------------------------------------------------------------


async def test_user_and_password_from_the_fields(password_server: NATSServer) -> None:
    """Given a server that wants user alice and her password,
    when the bus connects with `user` and `password`,
    then it connects and publishes."""
    config = isolated_config(password_server.url).replace(user="alice", password=PASSWORD)
    await connects_and_publishes(config)


async def test_user_and_password_in_the_url(password_server: NATSServer) -> None:
    """Given the user and password in the URL, when the bus connects, then it publishes."""
    url = f"nats://alice:{PASSWORD}@127.0.0.1:{password_server.port}"
    await connects_and_publishes(isolated_config(url))


async def test_the_password_field_wins_over_the_url(password_server: NATSServer) -> None:
    """Given a stale password in the URL and the right one in GDC_NATS_PASSWORD,
    when the bus connects with the config from the environment,
    then the variable's password is used."""
    url = f"nats://alice:old-password@127.0.0.1:{password_server.port}"
    base = isolated_config(url)
    config = NATSConfig.from_env(
        {"GDC_NATS_PASSWORD": PASSWORD},
        url=url,
        stream_name=base.stream_name,
        stream_subjects=base.stream_subjects,
        dlq_stream_name=base.dlq_stream_name,
        dlq_subject_prefix=base.dlq_subject_prefix,
    )
    await connects_and_publishes(config)


async def test_a_wrong_password_is_an_authorization_violation(
    password_server: NATSServer,
) -> None:
    """Given a wrong password, when the bus connects,
    then ConnectionFailed names the server and the server's refusal (not a reset socket),
    without the password."""
    config = isolated_config(password_server.url).replace(user="alice", password="wrong-pw")
    message = await refused(config)
    assert message == (
        f"cannot connect to NATS at {password_server.url}: authorization violation: "
        "the server refused user 'alice' and its password"
    )
    assert "wrong-pw" not in message


async def test_no_credentials_for_a_server_that_wants_them(password_server: NATSServer) -> None:
    """Given no credentials, when the bus connects, then the refusal says there were none."""
    message = await refused(isolated_config(password_server.url))
    assert message.endswith("the server refused a client without credentials")


def test_cli_wrong_password_exits_4_in_one_line(password_server: NATSServer) -> None:
    """Given `gdc-worker dlq list` with a wrong password in the URL,
    when it runs, then it exits 4 with one `Error:` line that hides the password."""
    url = f"nats://alice:wrong-s3cr3t@127.0.0.1:{password_server.port}"
    result = CliRunner().invoke(main, ["dlq", "list", "--url", url])
    assert result.exit_code == 4, result.output
    [line] = result.output.splitlines()
    assert line == (
        f"Error: cannot connect to NATS at nats://alice:***@127.0.0.1:{password_server.port}: "
        "authorization violation: the server refused user 'alice' and its password"
    )


def test_worker_with_a_wrong_password_exits_4(password_server: NATSServer) -> None:
    """Given `gdc-worker run` with GDC_NATS_USER and a wrong GDC_NATS_PASSWORD,
    when it runs as a process, then it exits 4 with one line, the password in no output."""
    env = {
        **os.environ,
        "GDC_NATS_URL": password_server.url,
        "GDC_NATS_USER": "alice",
        "GDC_NATS_PASSWORD": "wrong-s3cr3t",
    }
    result = subprocess.run(
        [GDC_WORKER, "run", "tests.apps.recorder:app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 4, result.stderr
    assert "wrong-s3cr3t" not in result.stderr + result.stdout
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: cannot connect to NATS at")
    assert "authorization violation" in line


def test_help_shows_no_secret() -> None:
    """Given secrets in the environment, when `--help` is shown, then none of them is in it."""
    env = {"GDC_NATS_URL": "nats://a:url-s3cr3t@h:1", "GDC_NATS_PASSWORD": "env-s3cr3t"}
    for args in (["run", "--help"], ["dlq", "list", "--help"]):
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == 0
        assert "s3cr3t" not in result.output
        assert "--creds FILE" in result.output


# -- token ---------------------------------------------------------------------------------


async def test_token(token_server: NATSServer) -> None:
    """Given a token server, when the bus connects with `token` (or `token@` in the URL),
    then it publishes; with a wrong token it is refused without showing it."""
    await connects_and_publishes(isolated_config(token_server.url).replace(token=TOKEN))
    url = f"nats://{TOKEN}@127.0.0.1:{token_server.port}"
    await connects_and_publishes(isolated_config(url))
    message = await refused(isolated_config(token_server.url).replace(token="tok-wrong"))
    assert message.endswith("authorization violation: the server refused the token")
    assert "tok-wrong" not in message


# -- nkey ----------------------------------------------------------------------------------


async def test_nkey_seed_file(nkey_server: NkeyServer, tmp_path: Path) -> None:
    """Given a server that knows one user nkey, when the bus connects with its seed file,
    then it publishes; another user's seed is refused, naming the file."""
    server = nkey_server.server
    await connects_and_publishes(
        isolated_config(server.url).replace(nkey_seed_file=str(nkey_server.seed_file))
    )
    other = tmp_path / "other.nk"
    other.write_bytes(_new_user_seed())
    message = await refused(isolated_config(server.url).replace(nkey_seed_file=str(other)))
    assert message.endswith(f"authorization violation: the server refused the nkey in {other}")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "cannot read {path}: No such file or directory"),
        (b"not a seed\n", "{path} does not hold an nkey seed (S...)"),
    ],
    ids=["missing", "garbage"],
)
async def test_unusable_nkey_seed_file(
    nkey_server: NkeyServer, tmp_path: Path, content: bytes | None, reason: str
) -> None:
    """Given a seed file that is missing or holds no seed, when the bus connects,
    then ConnectionFailed names the field and the file before trying."""
    path = tmp_path / "user.nk"
    if content is not None:
        path.write_bytes(content)
    config = isolated_config(nkey_server.server.url).replace(nkey_seed_file=str(path))
    message = await refused(config)
    assert message.endswith("nkey_seed_file: " + reason.format(path=path))


# -- creds files ---------------------------------------------------------------------------


def _key(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _signed_jwt(claims: dict[str, object], signer: nkeys.KeyPair) -> str:
    """A NATS JWT (v2): `claims` with iat and jti, signed with ed25519 by `signer`."""
    claims = {"iat": int(time.time()), **claims}
    digest = hashlib.sha256(json.dumps(claims, separators=(",", ":")).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signed = f"{_b64(json.dumps({'typ': 'JWT', 'alg': 'ed25519-nkey'}).encode())}."
    signed += _b64(json.dumps(claims).encode())
    return f"{signed}.{_b64(signer.sign(signed.encode()))}"


def _public(key: nkeys.KeyPair) -> str:
    public: bytes = key.public_key
    return public.decode()


@dataclass
class CredsServer:
    """A server in operator mode (JWTs preloaded), a valid user's creds file, and one for a
    user its account never signed."""

    server: NATSServer
    creds_file: Path
    stranger_creds_file: Path


@pytest.fixture(scope="module")
def creds_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CredsServer]:
    """An operator, its system account and an account with JetStream, and that account's
    user: the chain of JWTs a real deployment's `nsc` makes."""
    operator = _key(nkeys.PREFIX_BYTE_OPERATOR)
    system, account = _key(nkeys.PREFIX_BYTE_ACCOUNT), _key(nkeys.PREFIX_BYTE_ACCOUNT)
    unlimited = {"subs": -1, "data": -1, "payload": -1, "conn": -1, "mem_storage": -1}
    unlimited |= {"disk_storage": -1, "streams": -1, "consumer": -1, "wildcards": True}

    def account_jwt(key: nkeys.KeyPair, name: str, limits: dict[str, object]) -> str:
        claims = {"iss": _public(operator), "sub": _public(key), "name": name}
        return _signed_jwt(
            {**claims, "nats": {"type": "account", "version": 2, **limits}}, operator
        )

    def creds_of(signer: nkeys.KeyPair, path: Path) -> Path:
        user = _key(nkeys.PREFIX_BYTE_USER)
        limits = {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
        claims = {"iss": _public(signer), "sub": _public(user), "name": "worker"}
        jwt = _signed_jwt({**claims, "nats": {"type": "user", "version": 2, **limits}}, signer)
        path.write_text(
            f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n"
            "------END USER NKEY SEED------\n"
        )
        return path

    operator_claims = {"iss": _public(operator), "sub": _public(operator), "name": "gdc"}
    operator_jwt = _signed_jwt(
        {**operator_claims, "nats": {"type": "operator", "version": 2}}, operator
    )
    preload = {
        _public(system): account_jwt(system, "SYS", {}),
        _public(account): account_jwt(account, "GDC", {"limits": unlimited}),
    }
    config = f"operator: {operator_jwt}\nsystem_account: {_public(system)}\n"
    config += "resolver: MEMORY\nresolver_preload: {\n"
    config += "".join(f"  {key}: {jwt}\n" for key, jwt in preload.items()) + "}\n"
    where = tmp_path_factory.mktemp("creds")
    with NATSServer(config=config) as server:
        yield CredsServer(
            server,
            creds_of(account, where / "worker.creds"),
            creds_of(_key(nkeys.PREFIX_BYTE_ACCOUNT), where / "stranger.creds"),
        )


async def test_a_creds_file_of_a_real_jwt_chain_connects(creds_server: CredsServer) -> None:
    """Given a server in operator mode and a user's creds file signed by its account,
    when the bus connects with creds_file, then it publishes to JetStream."""
    config = isolated_config(creds_server.server.url)
    await connects_and_publishes(config.replace(creds_file=str(creds_server.creds_file)))


async def test_a_creds_file_the_server_does_not_trust_is_refused_naming_it(
    creds_server: CredsServer,
) -> None:
    """Given a creds file whose user no account of the server signed,
    when the bus connects, then ConnectionFailed says the server refused that creds file."""
    path = str(creds_server.stranger_creds_file)
    config = isolated_config(creds_server.server.url).replace(creds_file=path)
    message = await refused(config)
    assert message.endswith(f"authorization violation: the server refused the creds file {path}")


def _creds(path: Path, claims: dict[str, object]) -> Path:
    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    jwt = f"{part({'typ': 'JWT', 'alg': 'ed25519-nkey'})}.{part(claims)}.c2ln"
    seed = _new_user_seed().decode()
    path.write_text(
        f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
    return path


async def test_an_expired_creds_file_is_named_before_trying(
    password_server: NATSServer, tmp_path: Path
) -> None:
    """Given a creds file whose JWT expired (the server would only say "Authorization
    Violation"), when the bus connects, then ConnectionFailed says it expired, and when."""
    creds = _creds(tmp_path / "user.creds", {"sub": "U", "exp": 1_700_000_000})
    config = isolated_config(password_server.url).replace(creds_file=str(creds))
    message = await refused(config)
    assert message == (
        f"cannot connect to NATS at {password_server.url}: creds_file: the user JWT in "
        f"{creds} expired at 2023-11-14 22:13:20 UTC"
    )


async def test_a_creds_file_that_has_not_expired_is_tried(
    password_server: NATSServer, tmp_path: Path
) -> None:
    """Given a creds file valid for an hour that this server does not know,
    when the bus connects, then the server's refusal names the creds file."""
    creds = _creds(tmp_path / "user.creds", {"sub": "U", "exp": int(time.time()) + 3600})
    message = await refused(isolated_config(password_server.url).replace(creds_file=str(creds)))
    assert message.endswith(f"authorization violation: the server refused the creds file {creds}")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "cannot read {path}: No such file or directory"),
        ("just text\n", "{path} is not a NATS .creds file (no user JWT and seed)"),
    ],
    ids=["missing", "not-creds"],
)
async def test_unusable_creds_file(
    password_server: NATSServer, tmp_path: Path, content: str | None, reason: str
) -> None:
    """Given a creds file that is missing or is not one (nats-py would loop forever on it),
    when the bus connects, then ConnectionFailed names the field and the file at once."""
    path = tmp_path / "user.creds"
    if content is not None:
        path.write_text(content)
    config = isolated_config(password_server.url).replace(creds_file=str(path))
    message = await refused(config)
    assert message.endswith("creds_file: " + reason.format(path=path))


def test_cli_creds_option_is_used_and_an_expired_one_exits_4(
    password_server: NATSServer, tmp_path: Path
) -> None:
    """Given `gdc-worker dlq list --creds FILE` with an expired creds file,
    when it runs, then it exits 4 with one line saying it expired."""
    creds = _creds(tmp_path / "user.creds", {"sub": "U", "exp": 1_700_000_000})
    args = ["dlq", "list", "--url", password_server.url, "--creds", str(creds)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 4, result.output
    [line] = result.output.splitlines()
    assert line.endswith(f"creds_file: the user JWT in {creds} expired at 2023-11-14 22:13:20 UTC")


# -- TLS -----------------------------------------------------------------------------------


async def test_tls_with_a_ca_file(tls_server: NATSServer, certs: Certificates) -> None:
    """Given a TLS server with a certificate of our CA, when the bus connects to its tls://
    URL trusting that CA, then it publishes."""
    config = isolated_config(tls_url(tls_server)).replace(tls_ca_file=str(certs.ca))
    await connects_and_publishes(config)


async def test_tls_url_with_system_trust_fails_fast(tls_server: NATSServer) -> None:
    """Given a tls:// URL and no CA file (the system's trust, which does not know our CA),
    when the bus connects, then it fails within the connect timeout saying the certificate
    is not trusted (it used to hang)."""
    config = isolated_config(tls_url(tls_server)).replace(connect_timeout=3.0)
    started = time.monotonic()
    message = await refused(config)
    assert time.monotonic() - started < 3.0
    assert message == (
        f"cannot connect to NATS at {tls_url(tls_server)}: TLS: the server's certificate is "
        "not trusted: unable to get local issuer certificate"
    )


async def test_tls_handshake_first_to_a_server_that_does_not_expect_it(
    tls_server: NATSServer, certs: Certificates
) -> None:
    """Given tls_handshake_first for a server that sends its INFO first,
    when the bus connects, then it fails within the connect timeout with a hint."""
    config = isolated_config(tls_url(tls_server)).replace(
        tls_ca_file=str(certs.ca), tls_handshake_first=True, connect_timeout=1.0
    )
    started = time.monotonic()
    message = await refused(config)
    assert time.monotonic() - started < 3.0
    # The server's plain INFO reaches the handshake, or nothing answers it: either way, a hint.
    assert message.endswith(
        "(does the server expect the TLS handshake first? unset tls_handshake_first)"
    )


async def test_mutual_tls(mtls_server: NATSServer, certs: Certificates) -> None:
    """Given a server that verifies client certificates,
    when the bus connects with our client certificate and key, then it publishes;
    without one, the failure is one line naming the server."""
    base = isolated_config(tls_url(mtls_server)).replace(tls_ca_file=str(certs.ca))
    await connects_and_publishes(
        base.replace(tls_cert_file=str(certs.client_cert), tls_key_file=str(certs.client_key))
    )
    message = await refused(base.replace(connect_timeout=2.0))
    # The server's alert, or (TLS 1.3 has it come after the handshake) a closed connection.
    assert message.startswith(f"cannot connect to NATS at {tls_url(mtls_server)}: ")
    assert message.endswith(
        (
            "TLS: the server requires a client certificate (tls_cert_file and tls_key_file)",
            "(does the server require a client certificate? tls_cert_file, tls_key_file)",
        )
    )


async def test_unreadable_tls_files(tls_server: NATSServer, tmp_path: Path) -> None:
    """Given a CA file that is missing, or not a certificate, when the bus connects,
    then ConnectionFailed names the field and the file."""
    missing = tmp_path / "missing.pem"
    config = isolated_config(tls_url(tls_server)).replace(tls_ca_file=str(missing))
    assert (await refused(config)).endswith(
        f"tls_ca_file: cannot read {missing}: No such file or directory"
    )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    config = config.replace(tls_ca_file=str(garbage))
    assert (await refused(config)).endswith(f"tls_ca_file: {garbage} holds no PEM certificate")


# -- the settings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"),
    [("true", True), ("YES", True), ("1", True), ("False", False), ("no", False), ("0", False)],
)
def test_boolean_settings_from_the_environment(raw: str, value: bool) -> None:
    """Given GDC_NATS_TLS_HANDSHAKE_FIRST as true/false/1/0/yes/no in any case,
    when the config is read, then it is that boolean."""
    config = NATSConfig.from_env({"GDC_NATS_TLS_HANDSHAKE_FIRST": raw})
    assert config.tls_handshake_first is value


def test_a_boolean_setting_that_is_not_one() -> None:
    """Given GDC_NATS_TLS_HANDSHAKE_FIRST=maybe, then ConfigError names the variable."""
    with pytest.raises(ConfigError, match=r"^GDC_NATS_TLS_HANDSHAKE_FIRST: 'maybe' is not a valid"):
        NATSConfig.from_env({"GDC_NATS_TLS_HANDSHAKE_FIRST": "maybe"})


def test_credentials_from_the_environment() -> None:
    """Given every credential and TLS variable, when the config is read, then each is set."""
    env = {
        "GDC_NATS_USER": "alice",
        "GDC_NATS_PASSWORD": "p",
        "GDC_NATS_TOKEN": "t",
        "GDC_NATS_CREDS_FILE": "/c.creds",
        "GDC_NATS_TLS_CA_FILE": "/ca.pem",
        "GDC_NATS_TLS_CERT_FILE": "/cert.pem",
        "GDC_NATS_TLS_KEY_FILE": "/key.pem",
    }
    config = NATSConfig.from_env(env)
    assert (config.user, config.password, config.token) == ("alice", "p", "t")
    assert config.creds_file == "/c.creds"
    assert (config.tls_ca_file, config.tls_cert_file, config.tls_key_file) == (
        "/ca.pem",
        "/cert.pem",
        "/key.pem",
    )
    assert config.uses_tls


def test_secrets_stay_out_of_repr_and_errors() -> None:
    """Given secrets in the fields and the URL, then `repr()` shows none of them, and a
    secret of the wrong type is refused without showing it."""
    config = NATSConfig(url="nats://a:url-s3cr3t@h:1", password="pw-s3cr3t", token="tk-s3cr3t")
    assert "s3cr3t" not in repr(config)
    assert "nats://a:***@h:1" in repr(config)
    with pytest.raises(ConfigError, match=r"^password: must be a string, got bytes$"):
        NATSConfig(password=b"pw-s3cr3t")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^tls_handshake_first: must be true or false"):
        NATSConfig(tls_handshake_first="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^tls_key_file: given without tls_cert_file"):
        NATSConfig(tls_key_file="/key.pem")


def test_uses_tls() -> None:
    """TLS is used for tls:// URLs and any TLS option, not for a plain nats:// URL."""
    assert not NATSConfig().uses_tls
    assert NATSConfig(url="tls://h:4222").uses_tls
    assert NATSConfig(tls_ca_file="/ca.pem").uses_tls


def test_creds_from_the_environment_reach_an_app_with_its_own_config(
    password_server: NATSServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given an app built with its own NATSConfig (which reads no environment), and an
    expired creds file in GDC_NATS_CREDS_FILE,
    when `gdc-worker run` runs it, then the creds file is used, as --url's variable is: the
    run exits 4 saying it expired (replicas of --processes get it the same way)."""
    module = tmp_path / "own_config.py"
    module.write_text(
        "from gdc_worker import App, NATSConfig\n"
        f"app = App('own', NATSConfig(url={password_server.url!r}))\n"
        "@app.on('node.up')\n"
        "async def handle(event):\n"
        "    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    creds = _creds(tmp_path / "user.creds", {"sub": "U", "exp": 1_700_000_000})

    result = CliRunner().invoke(
        main, ["run", "own_config:app"], env={"GDC_NATS_CREDS_FILE": str(creds)}
    )

    assert result.exit_code == 4, result.output
    assert result.output.splitlines()[-1].endswith(
        f"creds_file: the user JWT in {creds} expired at 2023-11-14 22:13:20 UTC"
    )
