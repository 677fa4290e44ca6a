"""Deterministic UIDs: the same source series, model and provenance always give the same result UIDs."""

from __future__ import annotations

import uuid

# fixed namespace so that UIDs are stable across hosts and releases
_NAMESPACE = uuid.UUID("8f1d3c52-5b7e-4f0a-9a55-0c1e6b2d7a91")


def result_uid(source_series_uid: str, source_instance_uids: list[str], model: str, model_version: str, role: str) -> str:
    """A ``2.25.`` UID (PS3.5 B.2, from a name-based UUID) derived from the inputs.

    ``model_version`` stands for everything besides the source that can change the result: the
    encoder passes the model's version with the settings' fingerprint, the digest of the model's
    files, the failed plausibility checks and a study model's other inputs. ``role`` tells apart
    the UIDs of one result set (SEG series, SR instance, ...).
    """
    name = "\\".join([source_series_uid, *sorted(source_instance_uids), model, model_version, role])
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"
