"""DSSE envelopes holding in-toto statements: the one signed form the farm publishes.

DSSE signs the pre-authentication encoding ``DSSEv1 <len> <type> <len> <payload>`` of
the payload bytes, so a signature cannot be moved to another payload type; the payload
is an in-toto v1 statement (subjects by digest, a predicate type, a predicate).
https://github.com/secure-systems-lab/dsse and https://in-toto.io/Statement/v1.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from imagefarm.errors import SignatureError

from .keys import Signer, TrustStore

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
ENVELOPE_MEDIA = "application/vnd.dsse.envelope.v1+json"


def pae(payload_type: str, payload: bytes) -> bytes:
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def statement(subjects: list[tuple[str, str]], predicate_type: str, predicate: dict[str, Any]) -> dict[str, Any]:
    """An in-toto statement over ``subjects`` ((name, "sha256:<hex>") pairs)."""
    return {"_type": STATEMENT_TYPE,
            "subject": [{"name": n, "digest": {d.split(":", 1)[0]: d.split(":", 1)[1]}} for n, d in subjects],
            "predicateType": predicate_type, "predicate": predicate}


def seal(signer: Signer, stmt: dict[str, Any]) -> dict[str, Any]:
    """The DSSE envelope of ``stmt``, signed by ``signer``."""
    body = json.dumps(stmt, sort_keys=True, separators=(",", ":")).encode()
    sig = signer.sign(pae(PAYLOAD_TYPE, body))
    return {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(body).decode(),
            "signatures": [{"keyid": signer.keyid, "sig": base64.b64encode(sig).decode()}]}


def open_envelope(env: Any, trust: TrustStore, *, what: str, predicate_type: str,
                  subject_digest: str) -> dict[str, Any]:
    """The statement inside ``env`` if a trusted key signed it and it speaks of
    ``subject_digest`` with ``predicate_type``; ``SignatureError`` naming ``what`` otherwise."""
    try:
        if env["payloadType"] != PAYLOAD_TYPE:
            raise SignatureError(f"{what}: envelope holds {env['payloadType']!r}, not an in-toto statement")
        body = base64.b64decode(env["payload"], validate=True)
        sigs = [(s["keyid"], base64.b64decode(s["sig"], validate=True)) for s in env["signatures"]]
    except (KeyError, TypeError, ValueError):
        raise SignatureError(f"{what}: not a DSSE envelope") from None
    data = pae(PAYLOAD_TYPE, body)
    if not any(trust.verify(kid, sig, data) for kid, sig in sigs):
        ids = ", ".join(k[:12] for k, _ in sigs) or "none"
        raise SignatureError(f"{what}: no valid signature by a trusted key (signed by key {ids}; "
                             f"trusted: {', '.join(k[:12] for k in trust.keys) or 'none'}): "
                             "add the signer's public key to IMAGEFARM_TRUSTED_KEYS if you trust it")
    try:
        stmt = json.loads(body)
        algo, hexd = subject_digest.split(":", 1)
        subjects = [s["digest"].get(algo) for s in stmt["subject"]]
        ptype = stmt["predicateType"]
        stmt["predicate"]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise SignatureError(f"{what}: the signed statement is not an in-toto statement") from None
    if stmt.get("_type") != STATEMENT_TYPE or ptype != predicate_type:
        raise SignatureError(f"{what}: signed statement is of type {ptype!r}, not {predicate_type!r}")
    if hexd not in subjects:
        raise SignatureError(f"{what}: the signature is for another subject, not {subject_digest[:19]}")
    return stmt
