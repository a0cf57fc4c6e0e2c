"""Access-token attacks: every forged, altered, expired or misdirected token is a 401."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwt

from functions.gateway.app import create_app
from shared.auth.requests import credentials
from shared.auth.tokens import decode_access_token, issue_access_token
from shared.errors import AuthError


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, claims: dict, key: bytes | None) -> str:
    """A JWT assembled by hand (python-jose refuses to create some of these)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    sig = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def claims_for(settings, user, **changes) -> dict:
    now = int(time.time())
    base = {"iss": settings.jwt_issuer, "aud": settings.jwt_audience, "sub": user.id, "email": user.email,
            "typ": "access", "iat": now, "nbf": now, "exp": now + 600, "jti": "j" + str(now)}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def refused(client, token) -> bool:
    r = client.get("/me", headers={"Authorization": f"Bearer {token}"})
    return r.status_code == 401 and r.json["error"]["code"] in {"invalid_token", "token_expired"}


def test_a_genuine_token_is_accepted(client, user):
    assert client.get("/me", headers=user.headers).status_code == 200


def test_alg_none_is_refused(client, gw_settings, user):
    token = forge({"alg": "none", "typ": "JWT"}, claims_for(gw_settings, user), None)
    assert refused(client, token)
    token = forge({"alg": "None", "typ": "JWT"}, claims_for(gw_settings, user), None)
    assert refused(client, token)


def test_wrong_secret_is_refused(client, gw_settings, user):
    token = jwt.encode(claims_for(gw_settings, user), "another-secret-of-sufficient-length!!", algorithm="HS256")
    assert refused(client, token)


def test_other_hmac_algorithm_is_refused(client, gw_settings, user):
    token = jwt.encode(claims_for(gw_settings, user), gw_settings.jwt_secret, algorithm="HS512")
    assert refused(client, token)


def test_tampered_claims_are_refused(client, gw_settings, user, make_user):
    victim = make_user()
    header, _, sig = user.token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(user.token.split(".")[1] + "=="))
    payload["sub"] = victim.id
    assert refused(client, f"{header}.{b64(json.dumps(payload).encode())}.{sig}")


def test_expired_token_is_refused(client, gw_settings, user):
    token, _ = issue_access_token(gw_settings, {"id": user.id, "email": user.email},
                                  now=time.time() - gw_settings.access_token_ttl_s - 5)
    r = client.get("/me", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401 and r.json["error"]["code"] == "token_expired"


@pytest.mark.parametrize("change", [{"aud": "someone-else"}, {"iss": "evil"}, {"typ": "refresh"},
                                    {"exp": None}, {"jti": None}, {"aud": None}])
def test_wrong_or_missing_claims_are_refused(client, gw_settings, user, change):
    token = jwt.encode(claims_for(gw_settings, user, **change), gw_settings.jwt_secret, algorithm="HS256")
    assert refused(client, token)


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "e30.e30.", "x" * 5000])
def test_garbage_is_refused(client, token):
    r = client.get("/me", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401


def _rsa_pair() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


def test_rs256_accepts_its_own_tokens_and_refuses_hs256_signed_with_the_public_key(gw_settings, user):
    private, public = _rsa_pair()
    rs = gw_settings.replace(jwt_algorithm="RS256", jwt_private_key=private, jwt_public_key=public)
    client = create_app(rs).test_client()
    good, _ = issue_access_token(rs, {"id": user.id, "email": user.email})
    assert jwt.get_unverified_header(good)["alg"] == "RS256"
    assert client.get("/me", headers={"Authorization": f"Bearer {good}"}).status_code == 200
    # Algorithm confusion: an HS256 token whose HMAC key is the (public) RSA key.
    confused = forge({"alg": "HS256", "typ": "JWT"}, claims_for(rs, user), public.encode())
    assert refused(client, confused)
    with pytest.raises(AuthError):
        decode_access_token(rs, confused)
    # An HS256 token made with the HS secret is refused by the RS256 deployment too.
    hs = jwt.encode(claims_for(rs, user), gw_settings.jwt_secret, algorithm="HS256")
    assert refused(client, hs)


def test_rs256_token_is_refused_by_an_hs256_deployment(client, gw_settings, user):
    private, _ = _rsa_pair()
    token = jwt.encode(claims_for(gw_settings, user), private, algorithm="RS256")
    assert refused(client, token)


def test_query_token_and_header_forms(gw_settings, user):
    assert credentials({"authorization": f"bearer {user.token}"}) == ("bearer", user.token)
    assert credentials({}, query_token="t") == ("bearer", "t")
    assert credentials({"X-Api-Key": "tfk_x"}) == ("apikey", "tfk_x")
    assert credentials({"Authorization": "ApiKey tfk_y"}) == ("apikey", "tfk_y")
    assert credentials({"Authorization": "Basic abc"}) is None
