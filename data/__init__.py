"""The toy world's generator (toyworld.py): `python -m data.toyworld` from the repository root."""
