"""Small shared helpers (atomic file writes, JSON records)."""

from .io import append_jsonl, atomic_open, atomic_write_bytes, atomic_write_text, read_json, write_json

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "write_json", "read_json", "append_jsonl"]
