"""API keys and tenants: which namespace a request's KV is hashed in.

Keys come from a JSON file (the ingress's ``server.api_keys_file``) or, with the same
content, the environment variable ``MEPIC_API_KEYS``: ``{"keys": {"<key>": "<tenant>"}}``.
Several keys may name one tenant (rotation). With neither set there are no tenants: one
namespace, everything shared, no key asked for. Keys are never logged or echoed: errors
name a key by its position in the file.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from deployments.protocol import ApiError
from mepic_ray.hashing import PUBLIC_NAMESPACE

ENV_VAR = "MEPIC_API_KEYS"
# Short keys can be guessed; the charset is what an HTTP header carries unmangled.
MIN_KEY_CHARS, MAX_KEY_CHARS = 16, 512
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


class ApiKeyError(ValueError):
    """The key file or variable is malformed: the ingress refuses to start."""


class Unauthorized(ApiError):
    """A request without a valid key: 401, as OpenAI answers one."""

    def __init__(self, message: str):
        super().__init__(message, status=401, code="invalid_api_key")

    def response(self, retry_after: int | None = None):
        reply = super().response(retry_after)
        reply.headers["www-authenticate"] = "Bearer"
        return reply


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class ApiKeys:
    """Key -> tenant name, validated at construction (``source`` names where the keys
    came from in error messages)."""
    keys: Mapping[str, str] = field(repr=False)
    source: str = "the API keys"

    def __post_init__(self) -> None:
        if not isinstance(self.keys, Mapping) or not self.keys:
            raise ApiKeyError(f"{self.source}: 'keys' must map at least one key to a tenant")
        for i, (key, tenant) in enumerate(self.keys.items(), 1):
            if not isinstance(key, str) or not MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS \
                    or not all("!" <= c <= "~" for c in key):
                raise ApiKeyError(f"{self.source}: key {i} must be {MIN_KEY_CHARS} to {MAX_KEY_CHARS} printable "
                                  "ASCII characters without spaces")
            if not isinstance(tenant, str) or not TENANT_NAME.fullmatch(tenant):   # not echoed: it may be a key
                raise ApiKeyError(f"{self.source}: the tenant of key {i} must match {TENANT_NAME.pattern}")
            if tenant == PUBLIC_NAMESPACE:
                raise ApiKeyError(f"{self.source}: the tenant of key {i} is {PUBLIC_NAMESPACE!r}, the namespace "
                                  "every tenant shares: choose another name")
        # Digests, so every comparison takes the same time whatever the key's length.
        object.__setattr__(self, "_digests", tuple((_digest(k), t) for k, t in self.keys.items()))

    @classmethod
    def parse(cls, text: str, source: str) -> "ApiKeys":
        def pairs(items: list) -> dict:
            out = dict(items)
            if len(out) < len(items):   # json.loads would keep the last silently
                keys = [k for k, _ in items]
                dup = next(i for i, k in enumerate(keys, 1) if k in keys[:i - 1])
                raise ApiKeyError(f"{source}: key {dup} appears twice")
            return out
        try:
            doc = json.loads(text, object_pairs_hook=pairs)
        except json.JSONDecodeError as e:   # its message has a position, never the text
            raise ApiKeyError(f'{source}: not JSON of the form {{"keys": {{"<key>": "<tenant>"}}}} ({e})') from None
        if not isinstance(doc, dict) or set(doc) != {"keys"} or not isinstance(doc["keys"], dict):
            raise ApiKeyError(f'{source}: expected {{"keys": {{"<key>": "<tenant>", ...}}}} and nothing else')
        return cls(doc["keys"], source)

    def tenant(self, authorization: str | None) -> str:
        """The tenant of an ``Authorization: Bearer <key>`` header; raises Unauthorized."""
        scheme, _, key = (authorization or "").strip().partition(" ")
        if not authorization:
            raise Unauthorized("missing API key: send it as 'Authorization: Bearer <key>'")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <key>'")
        digest, found = _digest(key.strip()), None
        for d, t in self._digests:    # no early exit: the time says nothing about which key matched
            if hmac.compare_digest(d, digest):
                found = t
        if found is None:
            raise Unauthorized("invalid API key")
        return found


def load_api_keys(path: str | None, environ: Mapping[str, str] = os.environ) -> ApiKeys | None:
    """The keys of the file at ``path`` or of ``MEPIC_API_KEYS``; None when neither is set."""
    env = environ.get(ENV_VAR)
    if path is not None and env is not None:
        raise ApiKeyError(f"both server.api_keys_file and {ENV_VAR} are set: use one")
    if path is None:
        return None if env is None else ApiKeys.parse(env, ENV_VAR)
    if not isinstance(path, str) or not path:
        raise ApiKeyError(f"server.api_keys_file must be a file path, got {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ApiKeyError(f"cannot read server.api_keys_file {path!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ApiKeyError(f"server.api_keys_file {path!r} is not UTF-8 text") from None
    return ApiKeys.parse(text, f"server.api_keys_file {path!r}")
