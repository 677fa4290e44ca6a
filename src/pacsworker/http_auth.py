"""Who may use the HTTP doors: STOW-RS and ``POST /pull`` (``scp.stow_auth``) and the operator port's
page and ``/metrics`` (``metrics.auth``).

``authenticator(section).check(authorization, peer, scope)`` answers one request's Authorization
header with a :class:`Decision`: 200, 401 with a WWW-Authenticate challenge, or 403 (a token without
the scope). Every refusal is logged with the peer and the reason, never the password or token.

- ``basic``: a users file of ``user:scrypt$N$r$p$salt$hash`` lines. scrypt (RFC 7914) rather than
  PBKDF2 because it is memory-hard: a stolen file costs an attacker memory per guess, not only
  GPU cycles. A header that passed once is remembered (keyed by a keyed hash of it), so a client
  pays the KDF once; at most two KDF runs go at once, so wrong passwords cannot exhaust memory.
- ``bearer``: a tokens file, one token per line, compared in constant time.
- ``oauth2``: JWT access tokens verified with PyJWT against the issuer's JWKS, fetched on first use
  (never at start-up), cached, and fetched again for an unknown key id at most once per
  ``jwks_refetch_seconds``.

Both files are read again when they change; a malformed file is an error naming file and line at
start-up, and later keeps the last good contents (logged) rather than opening or closing the door.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from .config import BasicUsers, BearerTokens, ConfigError, DoorAuth, JwtIssuer, OpenDoor

log = logging.getLogger("pacsworker.auth")

SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1  # 32 MiB per hash: above RFC 7914's interactive example
SCRYPT_MAXMEM = 64 << 20
KDF_AT_ONCE = threading.BoundedSemaphore(2)  # wrong passwords in parallel cost at most 2 x 32 MiB
MIN_TOKEN_CHARS = 16
REMEMBERED_HEADERS = 1024


@dataclass(frozen=True)
class Decision:
    """One request's answer: ``ok`` with ``status`` 200, or a refusal (401, 403; 503: the issuer's keys
    could not be fetched) with its ``reason`` and the WWW-Authenticate ``challenge``."""

    ok: bool
    status: int
    reason: str
    principal: str = ""
    challenge: str | None = None


class AuthFileError(ConfigError):
    """A users or tokens file that cannot be read or holds a malformed line."""


# -- password hashes -------------------------------------------------------------------------------

def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64) of a password, with a fresh 16-byte salt."""
    salt = secrets.token_bytes(16)
    derived = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                             maxmem=SCRYPT_MAXMEM, dklen=32)
    return "$".join(("scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(derived)))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class PasswordHash:
    """A parsed ``scrypt$...`` hash; its parameters travel with it, so they can be raised later."""

    n: int
    r: int
    p: int
    salt: bytes
    derived: bytes

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        """Raises ValueError naming what is wrong (never the hash itself)."""
        fields = text.split("$")
        if len(fields) != 6 or fields[0] != "scrypt":
            raise ValueError("the hash is not scrypt$N$r$p$salt$hash (write it with `pacsworker users add`)")
        try:
            n, r, p = (int(v) for v in fields[1:4])
            salt, derived = base64.b64decode(fields[4], validate=True), base64.b64decode(fields[5], validate=True)
        except (ValueError, binascii.Error):
            raise ValueError("the hash's parameters or base64 fields are unreadable") from None
        if n < 1 << 14 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16 or len(salt) < 16 or len(derived) < 32:
            raise ValueError("the hash's scrypt parameters are too weak or invalid (N >= 16384, a power of 2; "
                             "salt >= 16 bytes)")
        if 128 * n * r * p > SCRYPT_MAXMEM:
            raise ValueError(f"the hash's scrypt parameters need more than {SCRYPT_MAXMEM >> 20} MiB")
        return cls(n, r, p, salt, derived)

    def matches(self, password: str) -> bool:
        with KDF_AT_ONCE:
            derived = hashlib.scrypt(password.encode(), salt=self.salt, n=self.n, r=self.r, p=self.p,
                                     maxmem=SCRYPT_MAXMEM, dklen=len(self.derived))
        return hmac.compare_digest(derived, self.derived)


# A user who is not in the file costs the same KDF run: the time of an answer does not tell who exists.
_NOBODY = PasswordHash(SCRYPT_N, SCRYPT_R, SCRYPT_P, bytes(16), bytes(32))


# -- files read again when they change -------------------------------------------------------------

T = TypeVar("T")
GONE = (-1, -1, -1)  # the stamp of a file that cannot be stat'ed


class WatchedFile(Generic[T]):
    """A file's parsed contents, parsed again when its modification time, size or inode changes.

    At construction a problem raises :class:`AuthFileError`; later, a problem is logged once and the
    last good contents stay in force.
    """

    def __init__(self, path: Path, what: str, parse: Callable[[list[str], Path], T]):
        self.path, self.what, self.parse = Path(path), what, parse
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.value = self._read()
        self.generation = 0  # counts reloads: caches derived from the contents compare it

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise AuthFileError(f"{self.what} {self.path}: cannot read it ({exc.strerror or exc})") from None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> T:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise AuthFileError(f"{self.what} {self.path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") \
                from None
        return self.parse(lines, self.path)

    def current(self) -> T:
        """The contents, read again first if the file changed."""
        try:
            stamp = self._stat()
        except AuthFileError as exc:
            if self._stamp != GONE:
                self._keep(GONE, str(exc))
            return self.value
        if stamp == self._stamp:
            return self.value
        with self._lock:
            if stamp != self._stamp:
                try:
                    self.value = self._read()
                    self.generation += 1
                    log.info("%s %s read again (it changed)", self.what, self.path)
                except AuthFileError as exc:
                    return self._keep(stamp, str(exc))
                self._stamp = stamp
        return self.value

    def _keep(self, stamp: tuple[int, int, int], problem: str) -> T:
        self._stamp = stamp  # say it once per change of the file, not once per request
        log.error("%s; the last good contents stay in force until it is fixed", problem)
        return self.value


def _content_lines(lines: list[str]) -> list[tuple[int, str]]:
    """Numbered lines that are neither blank nor ``#`` comments."""
    return [(number, line.strip()) for number, line in enumerate(lines, start=1)
            if line.strip() and not line.lstrip().startswith("#")]


def parse_users(lines: list[str], path: Path) -> dict[str, PasswordHash]:
    """``user:hash`` lines as a mapping; AuthFileError names the file and line of a bad one."""
    users: dict[str, PasswordHash] = {}
    for number, line in _content_lines(lines):
        user, colon, text = line.partition(":")
        try:
            if not colon or not user or any(c.isspace() for c in user):
                raise ValueError("not user:hash (a user name without spaces or colons)")
            if user in users:
                raise ValueError(f"user {user} is listed twice")
            users[user] = PasswordHash.parse(text)
        except ValueError as exc:
            raise AuthFileError(f"users file {path} line {number}: {exc}") from None
    if not users:
        raise AuthFileError(f"users file {path} holds no user: add one with `pacsworker users add {path} USER`")
    return users


def parse_tokens(lines: list[str], path: Path) -> list[bytes]:
    """The SHA-256 digests of the tokens (equal length: compared in constant time); errors name the line."""
    digests = []
    for number, token in _content_lines(lines):
        if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
            raise AuthFileError(f"tokens file {path} line {number}: a token is one word of at least "
                                f"{MIN_TOKEN_CHARS} characters (`openssl rand -hex 32` makes one)")
        digests.append(hashlib.sha256(token.encode()).digest())
    if not digests:
        raise AuthFileError(f"tokens file {path} holds no token")
    return digests


def add_user(path: Path, user: str, password: str) -> bool:
    """Write ``user``'s hash into the users file (created with mode 0600), replacing an earlier line of
    the same user; returns whether the user was new. The file is replaced atomically."""
    if not user or ":" in user or any(c.isspace() for c in user):
        raise ValueError(f"{user!r} is not a valid user name (no spaces, no colons)")
    if not password:
        raise ValueError("the password is empty")
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    entry = f"{user}:{hash_password(password)}"
    kept = [line for line in lines if line.partition(":")[0].strip() != user]
    new = len(kept) == len(lines)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write("\n".join([*kept, entry]) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    return new


# -- the checkers ------------------------------------------------------------------------------------

class Authenticator:
    """Checks one request's ``Authorization`` header; subclasses per ``kind``."""

    scheme = ""

    def __init__(self, settings: DoorAuth):
        self.settings = settings

    def check(self, authorization: str | None, peer: str, scope: str | None = None) -> Decision:
        """The decision for this header from ``peer``; ``scope``: the one this request needs (oauth2;
        None: the configured ``required_scope``). Refusals are logged."""
        try:
            decision = self._decide(authorization, scope)
        except Exception as exc:  # noqa: BLE001 - a check that breaks refuses (fails closed), and says why
            log.exception("HTTP request from %s: its credentials could not be checked", peer)
            decision = self._refuse(f"its credentials could not be checked ({type(exc).__name__})")
        if not decision.ok:
            log.warning("HTTP request from %s refused (%d): %s", peer, decision.status, decision.reason)
        return decision

    def _decide(self, authorization: str | None, scope: str | None) -> Decision:
        raise NotImplementedError

    def _credentials(self, authorization: str | None) -> str | None:
        """What follows this scheme's name in the header; None when absent or another scheme."""
        scheme, _, value = (authorization or "").strip().partition(" ")
        return value.strip() if scheme.lower() == self.scheme.lower() and value.strip() else None

    def _refuse(self, reason: str, status: int = 401, error: str = "") -> Decision:
        realm = getattr(self.settings, "realm", "pacsworker")
        challenge = f'{self.scheme} realm="{realm}"'
        if self.scheme == "Basic":
            challenge += ', charset="UTF-8"'
        elif error:  # RFC 6750 3.1
            challenge += f', error="{error}"'
        return Decision(False, status, reason, challenge=challenge)


class Anyone(Authenticator):
    """kind: none."""

    def check(self, authorization: str | None, peer: str, scope: str | None = None) -> Decision:
        return Decision(True, 200, "no authentication configured", principal="anonymous")


class UsersFile(Authenticator):
    """kind: basic, against a users file of scrypt hashes."""

    scheme = "Basic"
    settings: BasicUsers

    def __init__(self, settings: BasicUsers):
        super().__init__(settings)
        self.users = WatchedFile(settings.users_file, "users file", parse_users)
        self._key = secrets.token_bytes(32)  # keys the remembered headers: never stored in the clear
        self._passed: dict[bytes, str] = {}
        self._generation = 0

    def _decide(self, authorization: str | None, scope: str | None) -> Decision:
        encoded = self._credentials(authorization)
        if encoded is None:
            return self._refuse("no basic credentials")
        users = self.users.current()
        remembered = self._remembered(encoded)
        if remembered:
            return Decision(True, 200, "", principal=remembered)
        try:
            user, colon, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return self._refuse("malformed basic credentials")
        if not colon:
            return self._refuse("malformed basic credentials")
        known = users.get(user)
        matched = (known or _NOBODY).matches(password)
        if known is None or not matched:
            return self._refuse(f"wrong user name or password (user {user[:64]!r})")
        self._remember(encoded, user)
        return Decision(True, 200, "", principal=user)

    def _remembered(self, encoded: str) -> str:
        if self._generation != self.users.generation:  # the file changed: every earlier pass is void
            self._passed, self._generation = {}, self.users.generation
        return self._passed.get(hmac.digest(self._key, encoded.encode(), "sha256"), "")

    def _remember(self, encoded: str, user: str) -> None:
        if len(self._passed) >= REMEMBERED_HEADERS:
            self._passed = {}
        self._passed[hmac.digest(self._key, encoded.encode(), "sha256")] = user


class TokensFile(Authenticator):
    """kind: bearer, against a file of static tokens."""

    scheme = "Bearer"
    settings: BearerTokens

    def __init__(self, settings: BearerTokens):
        super().__init__(settings)
        self.tokens = WatchedFile(settings.tokens_file, "tokens file", parse_tokens)

    def _decide(self, authorization: str | None, scope: str | None) -> Decision:
        token = self._credentials(authorization)
        if token is None:
            return self._refuse("no bearer token")
        digest = hashlib.sha256(token.encode()).digest()
        matched = False
        for known in self.tokens.current():  # every token compared: the time does not tell which matched
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            return self._refuse("unknown bearer token", error="invalid_token")
        return Decision(True, 200, "", principal=f"token sha256:{digest.hex()[:12]}")


def who_may_pass(section: DoorAuth | None) -> str:
    """The login a door asks, in words (the start-up banner); reads nothing."""
    if isinstance(section, BasicUsers):
        return f"basic login (users in {section.users_file})"
    if isinstance(section, BearerTokens):
        return f"bearer tokens (in {section.tokens_file})"
    if isinstance(section, JwtIssuer):
        scope = f" with scope {section.required_scope}" if section.required_scope else ""
        return f"OAuth2 access tokens of {section.issuer} for {section.audience}{scope}"
    return "no login"


def authenticator(section: DoorAuth | None) -> Authenticator:
    """The checker of an auth section (``settings.scp.stow_auth``, ``settings.metrics.auth``), one per
    distinct section in the process, so files and keys are cached across calls. A users or tokens file
    that cannot be read is an :class:`AuthFileError` here: call it at start-up."""
    if section is None or isinstance(section, OpenDoor):
        return _ANYONE
    key = section.model_dump_json()
    with _BUILT_LOCK:
        built = _BUILT.get(key)
        if built is None:
            built = _BUILT[key] = _build(section)
        return built


def _build(section: DoorAuth) -> Authenticator:
    if isinstance(section, BasicUsers):
        return UsersFile(section)
    if isinstance(section, BearerTokens):
        return TokensFile(section)
    if isinstance(section, JwtIssuer):
        from .http_jwt import JwtTokens  # PyJWT only where oauth2 is configured

        return JwtTokens(section)
    raise TypeError(f"no authenticator for {type(section).__name__}")


_ANYONE = Anyone(OpenDoor(kind="none"))
_BUILT: dict[str, Authenticator] = {}
_BUILT_LOCK = threading.Lock()
