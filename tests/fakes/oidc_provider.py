"""A small OpenID Connect provider on loopback, enough for the authorization-code flow as
mozilla-django-oidc runs it (RS256 id tokens, a JWKS endpoint, userinfo):

- ``GET /authorize``: the browser's stop; the test reads ``state`` and ``nonce`` from the RP's
  redirect and calls ``issue_code(nonce, claims)`` instead of a login page;
- ``POST /token`` (form: ``grant_type=authorization_code``, ``code``, ``client_id``,
  ``client_secret``, ``redirect_uri``): an ``id_token`` signed with the provider's RSA key (``kid``
  in the header, ``aud`` the client id, the nonce), an access token;
- ``GET /jwks``: the public key; ``GET /userinfo`` (``Authorization: Bearer <access token>``): the
  claims the code was issued with (e-mail, groups).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from typing import Any
from urllib.parse import parse_qsl

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

KID = "fake-oidc-key-1"


class FakeOIDC:
    def __init__(self, client_id: str, client_secret: str) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.issuer = ""
        self._codes: dict[str, tuple[str, dict[str, Any]]] = {}
        self._tokens: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.token_requests = 0

    def issue_code(self, nonce: str, claims: dict[str, Any]) -> str:
        code = secrets.token_urlsafe(16)
        with self._lock:
            self._codes[code] = (nonce, claims)
        return code

    def jwks(self) -> dict[str, Any]:
        public = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**public, "kid": KID, "use": "sig", "alg": "RS256"}]}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, payload = self.handle(scope, body)
        data = json.dumps(payload).encode()
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": data})

    def handle(self, scope: dict[str, Any], body: bytes) -> tuple[int, dict[str, Any]]:
        path = scope["path"]
        if path == "/jwks":
            return 200, self.jwks()
        if path == "/token" and scope["method"] == "POST":
            form = dict(parse_qsl(body.decode()))
            if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
                return 401, {"error": "invalid_client"}
            with self._lock:
                self.token_requests += 1
                issued = self._codes.pop(form.get("code", ""), None)
            if issued is None or form.get("grant_type") != "authorization_code":
                return 400, {"error": "invalid_grant"}
            nonce, claims = issued
            now = int(time.time())
            id_token = jwt.encode(
                {
                    "iss": self.issuer,
                    "sub": claims["email"],
                    "aud": self.client_id,
                    "iat": now,
                    "exp": now + 300,
                    "nonce": nonce,
                },
                self.key,
                algorithm="RS256",
                headers={"kid": KID},
            )
            access = secrets.token_urlsafe(16)
            with self._lock:
                self._tokens[access] = claims
            return 200, {"access_token": access, "id_token": id_token, "token_type": "Bearer", "expires_in": 300}
        if path == "/userinfo":
            headers = dict(scope.get("headers", []))
            token = headers.get(b"authorization", b"").decode().removeprefix("Bearer ")
            with self._lock:
                known = self._tokens.get(token)
            if known is None:
                return 401, {"error": "invalid_token"}
            return 200, {"sub": known["email"], **known}
        return 404, {"error": "not_found"}
