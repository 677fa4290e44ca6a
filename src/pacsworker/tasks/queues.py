"""The queues' names, apart from the Celery app so that commands that only count messages (status,
metrics) do not import Celery."""

from __future__ import annotations

DELIVERY_QUEUE = "delivery"


def model_queue(model_name: str) -> str:
    """One queue per model, so a slow model cannot starve a fast one."""
    return f"model.{model_name}"
