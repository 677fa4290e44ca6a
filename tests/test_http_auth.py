"""Who may use the HTTP doors: the checker of scp.stow_auth and metrics.auth against real artefacts: a
users file the CLI writes, a tokens file, and JWTs signed with keys made here, checked against a JWKS
a real HTTP server on a loopback port publishes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pydicom
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from conftest import Pacsworker, free_port, port_open, wait_until, write_config
from test_delivery import PASSWORD, USER, pacs, pki  # noqa: F401 - a real Orthanc with basic auth, a test CA
from pacsworker.config import Settings
from pacsworker.http_auth import AuthFileError, authenticator

PEER = "192.0.2.7:50000"
CT06 = "ct06_ge_lightspeed_liver_3slice"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _users_add(users: Path, user: str, password: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pacsworker", "users", "add", str(users), user, "--password-stdin"],
                          input=password + "\n", capture_output=True, text=True, timeout=60)


def _auth(section: dict):
    return authenticator(Settings(scp={"stow_auth": section}).scp.stow_auth)


# -- basic -------------------------------------------------------------------------------------------

def test_basic_users_written_by_the_cli_pass_and_others_get_a_challenge(tmp_path, caplog):
    users = tmp_path / "users"
    added = _users_add(users, "alice", "correct horse battery")
    assert added.returncode == 0, added.stderr
    text = users.read_text()
    assert text.startswith("alice:scrypt$32768$8$1$") and "correct horse" not in text
    assert users.stat().st_mode & 0o777 == 0o600
    door = _auth({"kind": "basic", "users_file": str(users)})

    passed = door.check(_basic("alice", "correct horse battery"), PEER)
    assert (passed.ok, passed.status, passed.principal) == (True, 200, "alice")
    assert door.check(_basic("alice", "correct horse battery"), PEER).ok  # remembered: the same answer

    caplog.set_level(logging.WARNING, "pacsworker.auth")
    for header in (None, _basic("alice", "wrong"), _basic("mallory", "correct horse battery"), "Basic !!!",
                   "Bearer abc"):
        refused = door.check(header, PEER)
        assert (refused.ok, refused.status) == (False, 401), header
        assert refused.challenge == 'Basic realm="pacsworker", charset="UTF-8"'
    assert caplog.text.count(PEER) == 5 and "wrong user name or password (user 'alice')" in caplog.text
    assert "correct horse" not in caplog.text and "wrong" not in caplog.text.replace("wrong user", "")

    # a second user added while the file is in use, and a new password for the first: read again at once
    assert _users_add(users, "bob", "second password!").returncode == 0
    changed = _users_add(users, "alice", "a new password")
    assert changed.returncode == 0 and "new password" in changed.stderr
    assert door.check(_basic("bob", "second password!"), PEER).ok
    assert not door.check(_basic("alice", "correct horse battery"), PEER).ok  # the remembered pass is void
    assert door.check(_basic("alice", "a new password"), PEER).ok


def test_a_malformed_or_unreadable_users_file_is_refused_at_start_naming_file_and_line(tmp_path, caplog):
    users = tmp_path / "users"
    assert _users_add(users, "alice", "correct horse battery").returncode == 0
    good = users.read_text()
    users.write_text(good + "# a comment\n\nbob:$2y$10$notscrypt\n")
    with pytest.raises(AuthFileError, match=rf"users file {users} line 4: the hash is not scrypt"):
        _auth({"kind": "basic", "users_file": str(users), "realm": "one"})
    with pytest.raises(AuthFileError, match=rf"users file {tmp_path / 'none'}: cannot read it"):
        _auth({"kind": "basic", "users_file": str(tmp_path / "none")})

    # broken while running: the last good users stay, and the error is logged
    users.write_text(good)
    door = _auth({"kind": "basic", "users_file": str(users), "realm": "two"})
    users.write_text(good + "carol\n")
    assert door.check(_basic("alice", "correct horse battery"), PEER).ok
    assert f"users file {users} line 2: not user:hash" in caplog.text and "last good contents stay" in caplog.text
    users.unlink()  # removed: said once, not once per request
    assert door.check(_basic("alice", "correct horse battery"), PEER).ok
    assert door.check(_basic("alice", "correct horse battery"), PEER).ok
    assert caplog.text.count(f"users file {users}: cannot read it") == 1


def test_users_add_takes_no_password_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pacsworker", "users", "add", str(tmp_path / "u"), "alice",
                             "hunter2"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and not (tmp_path / "u").exists()
    bad = _users_add(tmp_path / "u", "al:ice", "password")
    assert bad.returncode == 2 and "not a valid user name" in bad.stderr


# -- bearer ------------------------------------------------------------------------------------------

def test_bearer_tokens_file_is_compared_and_read_again_on_change(tmp_path, caplog):
    tokens = tmp_path / "tokens"
    first, second = "a" * 20 + "first", "b" * 20 + "second"
    tokens.write_text(f"# scanners\n{first}\n")
    door = _auth({"kind": "bearer", "tokens_file": str(tokens)})
    assert door.check(f"Bearer {first}", PEER).ok
    caplog.set_level(logging.WARNING, "pacsworker.auth")
    for header in (None, f"Bearer {second}", f"Basic {first}", "Bearer"):
        refused = door.check(header, PEER)
        assert (refused.status, refused.challenge.split(",")[0]) == (401, 'Bearer realm="pacsworker"'), header
    assert first not in caplog.text and second not in caplog.text and caplog.text.count(PEER) == 4

    tokens.write_text(f"{second}\n")
    assert door.check(f"Bearer {second}", PEER).ok and not door.check(f"Bearer {first}", PEER).ok
    tokens.write_text("short\n")
    with pytest.raises(AuthFileError, match=rf"tokens file {tokens} line 1: a token is one word of at least 16"):
        _auth({"kind": "bearer", "tokens_file": str(tokens), "realm": "other"})


# -- oauth2 ------------------------------------------------------------------------------------------

class Issuer:
    """An OpenID issuer's metadata and JWKS on a real loopback HTTP server; counts the JWKS fetches."""

    def __init__(self):
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.published = {"k1": self.rsa, "e1": self.ec}
        self.jwks_fetches = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/jwks"}
                elif self.path == "/jwks":
                    issuer.jwks_fetches += 1
                    body = {"keys": [issuer.jwk(kid, key) for kid, key in issuer.published.items()]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def jwk(kid: str, key) -> dict:
        algorithm = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
        return {**json.loads(algorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig"}

    def token(self, kid: str = "k1", key=None, algorithm: str = "RS256", **claims) -> str:
        now = int(time.time())
        body = {"iss": self.url, "aud": "pacsworker-stow", "sub": "scanner-7", "iat": now, "exp": now + 300,
                "scope": "stow pull", **claims}
        return jwt.encode({k: v for k, v in body.items() if v is not None}, key or self.published[kid],
                          algorithm=algorithm, headers={"kid": kid})


@pytest.fixture
def issuer():
    server = Issuer()
    yield server
    server.server.shutdown()
    server.server.server_close()


def _hs256_with_public_key(issuer: Issuer) -> str:
    """The algorithm-confusion attack: HS256 keyed with the issuer's public key, which anyone has."""
    segment = lambda data: base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()  # noqa: E731
    now = int(time.time())
    signing_input = (f"{segment({'alg': 'HS256', 'typ': 'JWT', 'kid': 'k1'})}."
                     f"{segment({'iss': issuer.url, 'aud': 'pacsworker-stow', 'exp': now + 300, 'scope': 'stow'})}")
    public = json.dumps(Issuer.jwk("k1", issuer.rsa)).encode()
    mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def test_oauth2_accepts_the_issuers_tokens_and_refuses_every_bad_one(issuer, caplog):
    door = _auth({"kind": "oauth2", "issuer": issuer.url, "audience": "pacsworker-stow", "required_scope": "stow"})
    assert issuer.jwks_fetches == 0  # nothing fetched before the first request

    good = door.check(f"Bearer {issuer.token()}", PEER)
    assert (good.ok, good.status, good.principal) == (True, 200, "scanner-7")
    assert door.check(f"Bearer {issuer.token('e1', algorithm='ES256')}", PEER).ok
    assert issuer.jwks_fetches == 1  # found through the openid-configuration, then cached

    now = int(time.time())
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    caplog.set_level(logging.WARNING, "pacsworker.auth")
    refusals = {
        "expired": (issuer.token(exp=now - 3600, iat=now - 7200), "the token has expired"),
        "not yet valid": (issuer.token(nbf=now + 3600), "not valid yet"),
        "wrong issuer": (issuer.token(iss="https://elsewhere.example.org"), "issuer is not the configured"),
        "wrong audience": (issuer.token(aud="another-api"), "audience is not the configured"),
        "no expiry": (issuer.token(exp=None), "lacks a required claim"),
        "wrongly signed": (issuer.token(key=other_key), "signature does not verify"),
        "alg none": (jwt.encode({"iss": issuer.url, "aud": "pacsworker-stow", "exp": now + 60}, None,
                                algorithm="none", headers={"kid": "k1"}), "algorithm 'none' is not accepted"),
        "HS256 with the public key": (_hs256_with_public_key(issuer), "algorithm 'HS256' is not accepted"),
        "RS256 naming the EC key": (issuer.token("e1", key=issuer.rsa), "does not fit the issuer's EC key 'e1'"),
        "issued in the future": (issuer.token(iat=now + 3600), "not valid yet"),
        "not a JWT": ("not.a.jwt", "not a JWT"),
        "absent": (None, "no bearer token"),
    }
    for case, (token, reason) in refusals.items():
        refused = door.check(f"Bearer {token}" if token else None, PEER)
        assert (refused.ok, refused.status) == (False, 401), case
        assert reason in refused.reason, (case, refused.reason)
        assert refused.challenge.startswith('Bearer realm="pacsworker"'), case
        assert case == "absent" or 'error="invalid_token"' in refused.challenge, case
    assert caplog.text.count(PEER) == len(refusals) and issuer.token()[:40] not in caplog.text

    unscoped = door.check(f"Bearer {issuer.token(scope='read')}", PEER)
    assert (unscoped.ok, unscoped.status) == (False, 403) and "lacks scope stow" in unscoped.reason
    assert 'error="insufficient_scope", scope="stow"' in unscoped.challenge
    assert door.check(f"Bearer {issuer.token(scope=None, scp=['stow'])}", PEER).ok  # Azure's scp list
    assert door.check(f"Bearer {issuer.token()}", PEER, scope="pull").ok  # the scope a route asks for
    assert door.check(f"Bearer {issuer.token(scope='stow')}", PEER, scope="pull").status == 403
    assert issuer.jwks_fetches == 1


def test_oauth2_fetches_the_keys_again_once_for_an_unknown_key_id(issuer):
    door = _auth({"kind": "oauth2", "issuer": issuer.url, "audience": "pacsworker-stow",
                  "jwks_url": f"{issuer.url}/jwks"})
    assert door.check(f"Bearer {issuer.token()}", PEER).ok and issuer.jwks_fetches == 1

    issuer.published["k2"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # the issuer rotates
    assert door.check(f"Bearer {issuer.token('k2')}", PEER).ok
    assert issuer.jwks_fetches == 2

    # made-up key ids do not make the receiver fetch again within jwks_refetch_seconds
    for kid in ("k3", "k4", "k5"):
        stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        refused = door.check(f"Bearer {issuer.token(kid, key=stranger)}", PEER)
        assert refused.status == 401 and f"no key with the token's key id '{kid}'" in refused.reason
    assert issuer.jwks_fetches == 2


def test_oauth2_with_the_issuer_down_starts_and_answers_503(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    door = _auth({"kind": "oauth2", "issuer": closed, "audience": "pacsworker-stow"})  # no network at start
    down = door.check("Bearer a.b.c", PEER)
    assert down.status == 401  # not a JWT: refused before any key is needed
    token = jwt.encode({"iss": closed, "aud": "pacsworker-stow", "exp": int(time.time()) + 60},
                       rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256")
    unavailable = door.check(f"Bearer {token}", PEER)
    assert unavailable.status == 503 and f"the keys of issuer {closed} could not be fetched" in unavailable.reason


def test_oauth2_settings_refuse_symmetric_algorithms():
    with pytest.raises(ValueError, match="algorithms"):
        Settings(scp={"stow_auth": {"kind": "oauth2", "issuer": "https://i.example.org", "audience": "a",
                                    "algorithms": ["HS256"]}})


# -- a running receiver ------------------------------------------------------------------------------

def test_the_receiver_checks_the_files_at_start_and_its_doors_ask_their_logins(tmp_path, dicom_dir):
    """A bad tokens file stops the start; STOW-RS and /pull ask scp.stow_auth's bearer token before they
    read a body (nothing stored without it), the page and /metrics ask metrics.auth, the probes nothing."""
    from pacsworker.multipart import encode_multipart

    users, tokens = tmp_path / "users", tmp_path / "tokens"
    assert _users_add(users, "operator", "status page password").returncode == 0
    tokens.write_text("short\n")
    port, stow_port, metrics_port = free_port(), free_port(), free_port()
    sections = dict(
        scp={"port": port, "host": "127.0.0.1", "stow_port": stow_port,
             "stow_auth": {"kind": "bearer", "tokens_file": str(tokens)}, "pull_url": f"http://127.0.0.1:{free_port()}"},
        storage={"data_dir": str(tmp_path / "data")},
        metrics={"host": "127.0.0.1", "port": metrics_port, "auth": {"kind": "basic", "users_file": str(users)}},
    )
    refused = subprocess.run([sys.executable, "-m", "pacsworker", "scp", "--config",
                              str(write_config(tmp_path / "bad.yaml", **sections))],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
    said = " ".join(refused.stderr.split())
    assert refused.returncode == 2 and f"scp.stow_auth: tokens file {tokens} line 1: a token is one word" in said

    tokens.write_text("scanner-token-0123456789abcdef\n")
    scp = Pacsworker(["scp"], write_config(tmp_path / "c.yaml", **sections), tmp_path / "scp.log")
    try:
        wait_until(lambda: port_open(metrics_port) and port_open(stow_port), 60, what="the receiver's HTTP ports")
        url = f"http://127.0.0.1:{metrics_port}"
        for path in ("/metrics", "/"):
            anonymous = requests.get(url + path, timeout=10)
            assert anonymous.status_code == 401, path
            assert anonymous.headers["WWW-Authenticate"] == 'Basic realm="pacsworker", charset="UTF-8"'
            assert requests.get(url + path, auth=("operator", "wrong"), timeout=10).status_code == 401
            assert requests.get(url + path, auth=("operator", "status page password"), timeout=10).status_code == 200
        assert requests.get(url + "/healthz", timeout=10).status_code == 200  # probes need no login
        assert requests.get(url + "/readyz", timeout=10).status_code in (200, 503)

        instance = next((dicom_dir / "ct06_ge_lightspeed_liver_3slice").glob("*.dcm")).read_bytes()
        body, content_type = encode_multipart([("application/dicom", instance)])
        stow = f"http://127.0.0.1:{stow_port}"
        spool = tmp_path / "data" / "spool"
        for token in (None, "wrong-token-0123456789"):
            headers = {"Content-Type": content_type} | ({"Authorization": f"Bearer {token}"} if token else {})
            refused = requests.post(stow + "/studies", data=body, headers=headers, timeout=30)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert requests.post(stow + "/pull", json={"study": "1.2.3"}, timeout=30).status_code == 401
        assert not list(spool.rglob("*.dcm"))
        stored = requests.post(stow + "/studies", data=body, timeout=30, headers={
            "Content-Type": content_type, "Authorization": "Bearer scanner-token-0123456789abcdef"})
        assert stored.status_code == 200, stored.text
        assert len(list(spool.rglob("*.dcm"))) == 1

        def pull(*login: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "pacsworker", "pull", "--study", "1.2.3", *login, "--config",
                                   str(tmp_path / "c.yaml")], capture_output=True, text=True, timeout=120)

        anonymous = pull()
        assert anonymous.returncode == 1 and "pass --user or --token-file" in " ".join(anonymous.stderr.split())
        with_token = pull("--token-file", str(tokens))  # past the door: the PACS of pull_url does not answer
        assert with_token.returncode == 1 and "(401)" not in with_token.stderr and "(502)" in with_token.stderr
    finally:
        scp.stop()
    banner = " ".join(scp.output().split())
    assert f"bearer tokens (in {tokens})" in banner
    assert f"basic login (users in {users}) for the page and /metrics; /healthz and /readyz open for probes" in banner
    assert "wrong user name or password (user 'operator')" in banner and "127.0.0.1:" in banner


# -- the pull's client -------------------------------------------------------------------------------

def test_pull_signs_in_to_the_pacs_with_a_destinations_auth_and_tls(tmp_path, dicom_dir, pacs, pki):
    """POST /pull against a real Orthanc that asks basic auth, then through an HTTPS gateway in front of
    it that requires a client certificate of a test CA."""
    from dicomweb_client.api import DICOMwebClient
    from pacs_gateway import PacsGateway

    from pacsworker.scp.server import Receiver

    datasets = [pydicom.dcmread(path) for path in sorted((dicom_dir / CT06).glob("*.dcm"))]
    session = requests.Session()
    session.auth = (USER, PASSWORD)
    DICOMwebClient(url=pacs.dicomweb_url, session=session).store_instances(datasets)
    study = str(datasets[0].StudyInstanceUID)
    password = tmp_path / "pacs-password"
    password.write_text(PASSWORD + "\n")
    gateway = PacsGateway(pacs.url, (USER, PASSWORD), tls=pki["server"])

    def pull(**scp) -> requests.Response:
        stow_port = free_port()
        settings = Settings(scp={"host": "127.0.0.1", "port": free_port(), "stow_port": stow_port, **scp},
                            storage={"data_dir": str(tmp_path / "data")})
        receiver = Receiver(settings, lambda record: None)
        receiver.start()
        try:
            return requests.post(f"http://127.0.0.1:{stow_port}/pull", json={"study": study}, timeout=120)
        finally:
            receiver.stop()

    try:
        anonymous = pull(pull_url=pacs.dicomweb_url)
        assert anonymous.status_code == 502 and "401" in anonymous.text
        signed_in = pull(pull_url=pacs.dicomweb_url,
                         pull_auth={"kind": "basic", "username": USER, "password_file": str(password)})
        assert signed_in.status_code == 200, signed_in.text
        assert (signed_in.json()["stored"], signed_in.json()["refused"]) == (3, [])

        untrusted = pull(pull_url=f"{gateway.url}/dicom-web")
        assert untrusted.status_code == 502 and "CERTIFICATE_VERIFY_FAILED" in untrusted.text
        with_certificate = pull(pull_url=f"{gateway.url}/dicom-web", pull_tls={
            "ca_bundle": str(pki["ca"]), "client_certificate": str(pki["cert"]), "client_key": str(pki["key"])})
        assert with_certificate.status_code == 200, with_certificate.text
        assert with_certificate.json()["stored"] == 3
        assert any(path.startswith("/dicom-web/studies/") for _, path, _ in gateway.forwarded)
    finally:
        gateway.stop()
