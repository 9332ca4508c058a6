"""Where a model comes from: a local path, or a Hugging Face hub id fetched into the local cache.

The base backbone and every expert may be either. Online, a hub id is downloaded (or found in
the cache) by ``huggingface_hub``; with ``HF_HUB_OFFLINE=1`` only what is already cached can be
used, and a hub id that is not is a one-line error before any work.
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from .errors import UserError

# "org/name" or a legacy single-word id ("bert-base-uncased"); a path with a leading "/", "."
# or "~", or more than one "/", is never a hub id
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def is_hub_id(source: str) -> bool:
    return bool(HUB_ID.fullmatch(source)) and not source.endswith((".", ".."))


def resolve_source(source: str, what: str) -> Path:
    """``source`` as a local path: itself when it exists, else the snapshot of the hub id."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if not is_hub_id(source):
        raise UserError(
            f"{what} {path} does not exist (expected a local path or a Hugging Face hub id "
            "such as org/name)"
        )
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return Path(snapshot_download(source, local_files_only=offline))
    except LocalEntryNotFoundError:
        if offline:
            raise UserError(
                f"{what} '{source}' is neither a local path nor a hub id cached on this machine, "
                "and HF_HUB_OFFLINE=1 forbids downloading it; unset HF_HUB_OFFLINE or give a "
                "local path"
            ) from None
        raise UserError(
            f"{what} '{source}' is not a local path and could not be fetched from the Hugging "
            "Face hub (no connection?); give a local path or check the network"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{what} '{source}' is not a local path and the Hugging Face hub refused it "
            f"({first}); check the id or give a local path"
        ) from None
