"""The on-disk contract shared by the trainer's bundle, the exporter's model dir and the
runtime: format version, manifest schema, file hashing and atomic writes.

Standard library only (no torch, no numpy), so the runtime can import it.
"""

from .files import atomic_directory, sha256_file, write_json_atomic
from .manifest import (
    ALL_TASKS,
    FORMAT_VERSION,
    INPUT_INDEX,
    MANIFEST,
    MODALITIES,
    PARITY_BARS,
    PRECISIONS,
    TASK_IDS,
    ManifestError,
    Task,
    backbone_input_names,
    check_manifest,
    check_sha256_map,
    graph_inputs,
    parity_failure,
    parse_tasks,
    read_manifest,
    task_entries,
    verify_files,
)

__all__ = [
    "ALL_TASKS",
    "FORMAT_VERSION",
    "INPUT_INDEX",
    "MANIFEST",
    "MODALITIES",
    "PARITY_BARS",
    "PRECISIONS",
    "TASK_IDS",
    "ManifestError",
    "Task",
    "atomic_directory",
    "backbone_input_names",
    "check_manifest",
    "check_sha256_map",
    "graph_inputs",
    "parity_failure",
    "parse_tasks",
    "read_manifest",
    "sha256_file",
    "task_entries",
    "verify_files",
    "write_json_atomic",
]
