"""Credentials and TLS of DICOMweb (and DICOM TLS) destinations.

Secrets are read when a request is made, from the environment variable or file the configuration
names, and never logged. OAuth2 client-credentials tokens are cached per client in the process
(the delivery worker's threads share them) and renewed before they expire.
"""

from __future__ import annotations

import email.utils
import logging
import os
import ssl
import threading
import time
from pathlib import Path

import requests
from requests.auth import AuthBase, HTTPBasicAuth

from ..config import (
    BasicAuth,
    BearerAuth,
    ClientTlsSettings,
    NoAuth,
    OAuth2Auth,
)
from .outcome import DeliveryError

log = logging.getLogger("pacsworker.destinations")

RETRYABLE_HTTP = {408, 429}  # and every 5xx


def read_secret(env: str | None, file: Path | None, what: str) -> str:
    """The secret from the environment variable or the file (without its trailing newline).

    Raises
    ------
    DeliveryError
        Permanent: the variable is unset or empty, or the file cannot be read or is empty.
    """
    if env is not None:
        value = os.environ.get(env, "")
        if not value:
            raise DeliveryError(f"{what}: environment variable {env} is not set", permanent=True)
        return value
    assert file is not None
    try:
        value = Path(file).read_text().rstrip("\r\n")
    except OSError as exc:
        raise DeliveryError(f"{what}: cannot read {file} ({exc.strerror or exc})", permanent=True) from None
    if not value:
        raise DeliveryError(f"{what}: {file} is empty", permanent=True)
    return value


def retry_after_seconds(response: requests.Response) -> float | None:
    """HTTP Retry-After (seconds, or an HTTP date) as seconds from now; None when absent or unreadable."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def http_failure(response: requests.Response, what: str) -> DeliveryError:
    """A refused HTTP request, classified: 408, 429 and 5xx may heal by waiting; other 4xx will not."""
    status = response.status_code
    reason = f"{what}: HTTP {status} {response.reason or ''}".rstrip()
    if status in RETRYABLE_HTTP or status >= 500:
        return DeliveryError(reason, retry_after=retry_after_seconds(response))
    hint = {401: " (credentials refused: check auth)", 403: " (not allowed for these credentials)"}.get(status, "")
    return DeliveryError(reason + hint, permanent=True)


def connection_failure(exc: requests.RequestException, what: str) -> DeliveryError:
    """A request that got no answer; an untrusted server certificate is permanent, the rest may heal."""
    text = str(exc)
    if isinstance(exc, requests.exceptions.SSLError) and "CERTIFICATE_VERIFY_FAILED" in text:
        return DeliveryError(f"{what}: the server's TLS certificate is not trusted (tls.ca_bundle?): "
                             f"{_short(text)}", permanent=True)
    return DeliveryError(f"{what}: {type(exc).__name__}: {_short(text)}")


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _check_tls_files(tls: ClientTlsSettings) -> None:
    for key in ("ca_bundle", "client_certificate", "client_key"):
        path = getattr(tls, key)
        if path is not None and not Path(path).is_file():
            raise DeliveryError(f"tls.{key} {path} is not a readable file", permanent=True)


def _requests_tls(tls: ClientTlsSettings) -> dict:
    """``verify`` and ``cert`` arguments of requests for these TLS settings."""
    _check_tls_files(tls)
    verify: bool | str = str(tls.ca_bundle) if tls.verify and tls.ca_bundle else tls.verify
    cert = None
    if tls.client_certificate is not None:
        cert = (str(tls.client_certificate), str(tls.client_key)) if tls.client_key else str(tls.client_certificate)
    return {"verify": verify, "cert": cert}


def ssl_context(tls: ClientTlsSettings) -> ssl.SSLContext:
    """A client SSL context for DICOM TLS with these settings."""
    _check_tls_files(tls)
    context = ssl.create_default_context(cafile=str(tls.ca_bundle) if tls.ca_bundle else None)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.client_certificate is not None:
        context.load_cert_chain(str(tls.client_certificate), str(tls.client_key) if tls.client_key else None)
    return context


class StaticBearer(AuthBase):
    """``Authorization: Bearer`` with a token read for every request (a rotated file is picked up)."""

    def __init__(self, auth: BearerAuth):
        self.auth = auth

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        token = read_secret(self.auth.token_env, self.auth.token_file, "bearer token")
        request.headers["Authorization"] = f"Bearer {token}"
        return request


class TokenCache:
    """The current OAuth2 access token of one client, fetched with the client-credentials grant."""

    _caches: dict[tuple, TokenCache] = {}
    _caches_lock = threading.Lock()

    def __init__(self, auth: OAuth2Auth, tls: ClientTlsSettings):
        self.auth, self.tls = auth, tls
        self._lock = threading.Lock()
        self._token = ""
        self._renew_at = 0.0  # time.monotonic()

    @classmethod
    def of(cls, auth: OAuth2Auth, tls: ClientTlsSettings) -> TokenCache:
        """The process-wide cache of this client (token URL, client id, scope, audience)."""
        key = (auth.token_url, auth.client_id, auth.scope, auth.audience)
        with cls._caches_lock:
            cache = cls._caches.get(key)
            if cache is None or cache.auth != auth or cache.tls != tls:
                cache = cls._caches[key] = cls(auth, tls)
            return cache

    def token(self) -> tuple[str, bool]:
        """A valid token, and whether it was fetched just now (False: from the cache)."""
        with self._lock:
            if self._token and time.monotonic() < self._renew_at:
                return self._token, False
            self._token, self._renew_at = self._fetch()
            return self._token, True

    def discard(self, token: str) -> None:
        """Forget a token the server refused (unless another thread already replaced it)."""
        with self._lock:
            if self._token == token:
                self._token, self._renew_at = "", 0.0

    def _fetch(self) -> tuple[str, float]:
        auth = self.auth
        what = f"OAuth2 token endpoint {auth.token_url}"
        secret = read_secret(auth.client_secret_env, auth.client_secret_file, "OAuth2 client secret")
        form = {"grant_type": "client_credentials"}
        if auth.scope:
            form["scope"] = auth.scope
        if auth.audience:
            form["audience"] = auth.audience
        basic = None
        if auth.client_auth == "basic":
            basic = HTTPBasicAuth(auth.client_id, secret)
        else:
            form.update(client_id=auth.client_id, client_secret=secret)
        try:
            response = requests.post(auth.token_url, data=form, auth=basic, timeout=auth.timeout_seconds,
                                     headers={"Accept": "application/json"}, **_requests_tls(self.tls))
        except requests.RequestException as exc:
            raise connection_failure(exc, what) from None
        if not response.ok:
            error = http_failure(response, what)
            if error.permanent:  # RFC 6749 5.2: error and error_description say why, with no secret
                try:
                    body = response.json()
                    error = DeliveryError(f"{error} error={body.get('error', '?')}: "
                                          f"{_short(str(body.get('error_description', '')), 200)}", permanent=True)
                except ValueError:
                    pass
            raise error
        try:
            body = response.json()
            token = str(body["access_token"])
            lifetime = float(body.get("expires_in") or 0)
        except (ValueError, KeyError, TypeError):
            raise DeliveryError(f"{what}: the answer holds no access_token", permanent=True) from None
        if lifetime > 0:
            renew_at = time.monotonic() + lifetime - min(auth.renew_before_seconds, 0.1 * lifetime)
        else:
            renew_at = float("inf")  # no expires_in: used until a 401 says otherwise
        log.info("OAuth2 token for client %s fetched from %s (expires in %s)", auth.client_id, auth.token_url,
                 f"{lifetime:.0f} s" if lifetime > 0 else "unknown")
        return token, renew_at


class OAuth2Bearer(AuthBase):
    """``Authorization: Bearer`` from a :class:`TokenCache`; a 401 to a cached token fetches a new one
    and resends the request once."""

    def __init__(self, cache: TokenCache):
        self.cache = cache

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        token, fresh = self.cache.token()
        request.headers["Authorization"] = f"Bearer {token}"
        if not fresh:
            request.register_hook("response", self._renew_on_401)
        return request

    def _renew_on_401(self, response: requests.Response, **kwargs) -> requests.Response:
        if response.status_code != 401:
            return response
        sent = response.request.headers["Authorization"]
        self.cache.discard((sent.decode("latin-1") if isinstance(sent, bytes) else sent).removeprefix("Bearer "))
        token, _ = self.cache.token()
        log.info("%s refused a cached OAuth2 token (401): fetched a new one, request sent again", response.url)
        response.content  # noqa: B018 - read to the end so that the connection can be reused
        response.close()
        again = response.request.copy()
        again.headers["Authorization"] = f"Bearer {token}"
        resent = response.connection.send(again, **kwargs)
        resent.history.append(response)
        resent.request = again
        return resent


class _TlsSession(requests.Session):
    """A session whose own ``verify`` wins: requests lets REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE in the
    environment replace it, which would silently drop a configured ``tls.ca_bundle``."""

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None and self.verify is not True:  # a configured bundle, or verify: false
            merged["verify"] = self.verify
        return merged


def http_session(auth: NoAuth | BasicAuth | BearerAuth | OAuth2Auth | None, tls: ClientTlsSettings) -> requests.Session:
    """A requests session with these authentication and TLS settings (a dicomweb destination's, the pull's)."""
    session = _TlsSession()
    arguments = _requests_tls(tls)
    session.verify, session.cert = arguments["verify"], arguments["cert"]
    if isinstance(auth, BasicAuth):
        session.auth = HTTPBasicAuth(auth.username, read_secret(auth.password_env, auth.password_file, "password"))
    elif isinstance(auth, BearerAuth):
        session.auth = StaticBearer(auth)
    elif isinstance(auth, OAuth2Auth):
        session.auth = OAuth2Bearer(TokenCache.of(auth, tls))
    return session
