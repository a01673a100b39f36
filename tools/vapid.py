"""``make vapid-key``: a new VAPID key pair for Web Push (docs/notifications.md).

Prints ``VAPID_PRIVATE_KEY=<base64url of the raw 32-byte key>`` (one line, for the
dmcall-secrets Secret or an env file) and the public key browsers subscribe with. Keep the
key for good: every subscription is tied to it, and a new key strands them all.
"""

from __future__ import annotations

from services.notifications.vapid import generate_private_key, private_key_raw, public_key_b64


def main() -> None:
    key = generate_private_key()
    print(f"VAPID_PRIVATE_KEY={private_key_raw(key)}")
    print(f"# public key (applicationServerKey): {public_key_b64(key)}")


if __name__ == "__main__":
    main()
