"""The countdown model's identity, importable without torch (a cache hit needs only this)."""

LEAK = 1e-6  # keeps off-support inputs (impossible neighbours) at a valid distribution
FINGERPRINT = "countdown:v1:exact-chain-leak-1e-06"
