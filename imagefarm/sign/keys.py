"""The farm's ed25519 key pair, and the public keys it trusts.

The private half lives under the config directory (``$XDG_CONFIG_HOME/imagefarm/keys``,
not the cache: a cache may be wiped or shared), 0600 in a 0700 directory; it is made on
first use when absent, and the one line saying where goes to the caller's log. The
trusted keys are this machine's own public key plus every PEM file named by
``IMAGEFARM_TRUSTED_KEYS`` (files or directories of ``*.pub``, separated by ``:``).
A key id is the SHA-256 of the raw 32-byte public key, hex.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from imagefarm.errors import ConfigError
from imagefarm.settings import load_public_key, trusted_key_files

KEY_NAME = "farm.key"
PUB_NAME = "farm.pub"

_lock = threading.Lock()
_signers: dict[Path, "Signer"] = {}
_stores: dict[tuple[Path, str], "TrustStore"] = {}


def key_dir(config_dir: Path | str) -> Path:
    return Path(config_dir) / "keys"


def key_id(pub: Ed25519PublicKey) -> str:
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_pem(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class Signer:
    """This machine's private key: signs DSSE pre-authentication encodings."""

    key: Ed25519PrivateKey
    keyid: str
    path: Path

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)

    @property
    def public(self) -> Ed25519PublicKey:
        return self.key.public_key()


def init_keys(config_dir: Path | str, *, force: bool = False) -> tuple[Path, bool]:
    """Make the key pair under ``config_dir/keys`` unless it exists; (private path, made?).

    Made atomically (a temporary file linked into place), so two processes making it at
    once agree on one key."""
    d = key_dir(config_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    path = d / KEY_NAME
    if path.exists() and not force:
        _check_private(path)
        _write_public(path)
        return path, False
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = d / f".{KEY_NAME}.{os.getpid()}.{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
    finally:
        os.close(fd)
    try:
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:  # another process made it first: theirs it is
                return path, False
    finally:
        tmp.unlink(missing_ok=True)
    _write_public(path)
    with _lock:
        _signers.clear()
        _stores.clear()
    return path, True


def _write_public(path: Path) -> Path:
    pub = path.with_name(PUB_NAME)
    data = public_pem(_load_private(path).public_key())
    if not pub.exists() or pub.read_bytes() != data:
        tmp = pub.with_name(f".{PUB_NAME}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)
        tmp.replace(pub)
    return pub


def _check_private(path: Path) -> None:
    st = os.stat(path)
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(f"signing key {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}, "
                          f"uid {st.st_uid}): `chmod 600 {path}`, or make a new one with `imagefarm keys init --force`")


def _load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise ConfigError(f"signing key {path} cannot be read ({exc}): "
                          "make a new one with `imagefarm keys init --force`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is not an ed25519 key: make one with `imagefarm keys init --force`")
    return key


def signer(config_dir: Path | str, log: Callable[[str], None] | None = None) -> Signer:
    """This machine's signer (the key made on first use, with one line saying where)."""
    d = Path(config_dir)
    with _lock:
        hit = _signers.get(d)
    if hit is not None:
        return hit
    path, made = init_keys(d)
    if made:
        line = f"made the farm's signing key {path} (public half {path.with_name(PUB_NAME)}): " \
               "give the public half to every machine that reads what this one publishes (IMAGEFARM_TRUSTED_KEYS)"
        (log or _stderr)(line)
    key = _load_private(path)
    s = Signer(key, key_id(key.public_key()), path)
    with _lock:
        _signers[d] = s
    return s


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr)


class TrustStore:
    """The public keys a signature may be made with, by key id."""

    def __init__(self, keys: Iterable[Ed25519PublicKey]) -> None:
        self.keys = {key_id(k): k for k in keys}

    def verify(self, keyid: str, sig: bytes, data: bytes) -> bool:
        key = self.keys.get(keyid)
        if key is None:
            return False
        try:
            key.verify(sig, data)
        except InvalidSignature:
            return False
        return True


def trust_store(config_dir: Path | str, trusted: str | None) -> TrustStore:
    """This machine's own public key (if it has one) and those ``trusted`` names."""
    k = (Path(config_dir), trusted or "")
    with _lock:
        hit = _stores.get(k)
    if hit is not None:
        return hit
    keys = []
    own = key_dir(config_dir) / KEY_NAME
    if own.exists():
        keys.append(_load_private(own).public_key())
    if trusted:
        try:
            keys += [load_public_key(p) for p in trusted_key_files(trusted)]
        except ValueError as exc:
            raise ConfigError(f"IMAGEFARM_TRUSTED_KEYS: {exc}") from None
    store = TrustStore(keys)
    with _lock:
        _stores[k] = store
    return store
