"""Small shared helpers: atomic file writes and strict JSON (``io``), jobs split across processes
(``jobs``: rank environment, done-markers, file barriers), torch thread counts (``threads``),
file names that are not UTF-8 as storable text (``names``), old spellings of moved names (``deprecation``)."""

from .io import append_jsonl, atomic_open, atomic_write_bytes, atomic_write_text, jsonable, read_json, write_json
from .jobs import RankEnv, is_done, rank_env, read_marker, wait_for, write_marker
from .deprecation import moved
from .names import fs_name, text_name
from .threads import torch_threads

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "write_json", "read_json", "append_jsonl",
           "jsonable", "RankEnv", "rank_env", "write_marker", "read_marker", "is_done", "wait_for", "torch_threads",
           "text_name", "fs_name", "moved"]
