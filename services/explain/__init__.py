"""Explain service: occlusion maps and per-cell importance for a pinned npm1 version."""
