"""What the farm publishes is signed, and what it reads is checked against trusted keys.

``keys`` holds the ed25519 pair (private half 0600 under the config directory, made on
first use) and the trust store (own key + ``IMAGEFARM_TRUSTED_KEYS``); ``envelope``
seals in-toto statements in DSSE envelopes and opens them again; ``artifacts`` keeps
each signed statement beside its subject in the registry (``sha256-<hex>.<kind>``).
"""

from .artifacts import farm_signer, farm_trust, publish, read, tag_for
from .keys import Signer, TrustStore, init_keys, key_dir, signer, trust_store

__all__ = ["Signer", "TrustStore", "farm_signer", "farm_trust", "init_keys", "key_dir", "publish", "read",
           "signer", "tag_for", "trust_store"]
