"""The package format: manifest, archive safety, the path rule, checks (no runtime, no loop)."""
