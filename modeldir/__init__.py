"""The on-disk contract shared by the trainer's bundle, the exporter's model dir and the
runtime: format version, file hashing, atomic writes and the manifest schema.

Standard library only (no torch, no numpy), so the runtime can import it.
"""

from .files import atomic_directory, sha256_file, write_json_atomic

__all__ = ["atomic_directory", "sha256_file", "write_json_atomic"]
