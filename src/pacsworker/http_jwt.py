"""``kind: oauth2`` of :mod:`pacsworker.http_auth`: JWT access tokens (RFC 9068) verified with PyJWT
against the issuer's JSON Web Key Set.

Nothing is fetched at start-up (an issuer that is down must not stop the receiver from starting):
the keys are fetched on the first request that needs them, used for ``jwks_cache_seconds``, and
fetched again when a token names a key id they do not hold (the issuer rotated its keys), at most
once per ``jwks_refetch_seconds`` so that tokens with made-up key ids cannot make the receiver
hammer the issuer. Only the asymmetric algorithms configured are accepted: never ``none`` or HS*
(an HS256 token "signed" with the public key is the classic confusion attack).
"""

from __future__ import annotations

import logging
import threading
import time

import jwt
import requests

from .config import JwtIssuer
from .destinations.auth import _requests_tls
from .http_auth import Authenticator, Decision

log = logging.getLogger("pacsworker.auth")

REFUSALS: list[tuple[type[jwt.PyJWTError], str]] = [  # most specific first: several subclass others
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet (nbf or iat in the future)"),
    (jwt.InvalidIssuerError, "the token's issuer is not the configured issuer"),
    (jwt.InvalidAudienceError, "the token's audience is not the configured audience"),
    (jwt.MissingRequiredClaimError, "the token lacks a required claim"),
    (jwt.InvalidSignatureError, "the token's signature does not verify with the issuer's key"),
]


KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}  # JWA family -> the JWK kty it verifies with


class KeysUnavailable(Exception):
    """The issuer's keys could not be fetched (and none are cached)."""


class IssuerKeys:
    """The issuer's signing keys by key id, fetched lazily and cached (see the module docstring)."""

    def __init__(self, settings: JwtIssuer):
        self.settings = settings
        self._lock = threading.Lock()
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._refetched_at = float("-inf")
        self._jwks_url = settings.jwks_url

    def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key a token names (a token without ``kid``: the only key); None when the issuer has none
        such even after a permitted refetch. Raises KeysUnavailable when nothing could be fetched."""
        with self._lock:
            now = time.monotonic()
            if now - self._fetched_at > self.settings.jwks_cache_seconds:
                self._fetch(now)
            found = self._lookup(kid)
            if found is None and now - self._refetched_at >= self.settings.jwks_refetch_seconds:
                self._refetched_at = now
                log.info("a token names key id %r, which the issuer's keys do not hold: fetching them again",
                         (kid or "")[:64])
                self._fetch(now)
                found = self._lookup(kid)
            return found

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    def _fetch(self, now: float) -> None:
        """Replace the keys with the issuer's current ones; on failure keep the old ones (logged)."""
        try:
            url = self._jwks_url or self._discover()
            self._jwks_url = url
            keys = jwt.PyJWKSet.from_dict(self._get_json(url)).keys
        except (requests.RequestException, ValueError, jwt.PyJWKSetError, KeyError, TypeError) as exc:
            problem = f"the keys of issuer {self.settings.issuer} could not be fetched: {type(exc).__name__}: {exc}"
            if not self._keys:
                raise KeysUnavailable(problem) from None
            log.error("%s; the keys fetched before stay in use", problem)
            return
        self._keys = {key.key_id: key for key in keys if key.public_key_use in (None, "sig")}
        self._fetched_at = now
        log.info("keys of issuer %s fetched from %s: %d signing key(s)", self.settings.issuer, url, len(self._keys))

    def _discover(self) -> str:
        configuration = self._get_json(f"{self.settings.issuer.rstrip('/')}/.well-known/openid-configuration")
        return str(configuration["jwks_uri"])

    def _get_json(self, url: str) -> dict:
        response = requests.get(url, timeout=self.settings.timeout_seconds, headers={"Accept": "application/json"},
                                **_requests_tls(self.settings.tls))
        response.raise_for_status()
        return response.json()


class JwtTokens(Authenticator):
    """kind: oauth2: a bearer JWT signed by the issuer, for the audience, in its time, with the scope."""

    scheme = "Bearer"
    settings: JwtIssuer

    def __init__(self, settings: JwtIssuer):
        super().__init__(settings)
        self.keys = IssuerKeys(settings)

    def _decide(self, authorization: str | None, scope: str | None) -> Decision:
        token = self._credentials(authorization)
        if token is None:
            return self._refuse("no bearer token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return self._refuse("the bearer token is not a JWT", error="invalid_token")
        algorithm = header.get("alg")
        if algorithm not in self.settings.algorithms:
            return self._refuse(f"the token's algorithm {str(algorithm)[:16]!r} is not accepted "
                                f"({', '.join(self.settings.algorithms)})", error="invalid_token")
        kid = header.get("kid")
        try:
            key = self.keys.key(str(kid) if kid is not None else None)
        except KeysUnavailable as exc:
            return Decision(False, 503, str(exc))
        if key is None:
            reason = (f"the issuer has no key with the token's key id {str(kid)[:64]!r}" if kid is not None
                      else "the token names no key id and the issuer has several keys")
            return self._refuse(reason, error="invalid_token")
        if KEY_TYPES[str(algorithm)[:2]] != key.key_type:
            return self._refuse(f"the token's algorithm {algorithm} does not fit the issuer's {key.key_type} key "
                                f"{str(kid)[:64]!r}", error="invalid_token")
        try:
            claims = jwt.decode(token, key.key, algorithms=[str(algorithm)], audience=self.settings.audience,
                                issuer=self.settings.issuer, leeway=self.settings.leeway_seconds,
                                options={"require": ["exp", "iss", "aud"]})
        except jwt.PyJWTError as exc:
            reason = next((words for kind, words in REFUSALS if isinstance(exc, kind)), f"invalid token ({exc})")
            return self._refuse(reason, error="invalid_token")
        return self._scoped(claims, self.settings.required_scope if scope is None else scope)

    def _scoped(self, claims: dict, needed: str) -> Decision:
        granted = claims.get("scope", claims.get("scp", ""))
        granted_set = set(granted.split() if isinstance(granted, str) else map(str, granted or []))
        principal = str(claims.get("sub") or claims.get("client_id") or claims.get("azp") or "")
        missing = [s for s in needed.split() if s not in granted_set]
        if missing:
            refusal = self._refuse(f"the token of {principal[:64]!r} lacks scope {' '.join(missing)}", status=403,
                                   error="insufficient_scope")
            return Decision(False, 403, refusal.reason, principal, f'{refusal.challenge}, scope="{needed}"')
        return Decision(True, 200, "", principal=principal)
