"""Which model (if any) a complete series goes to, and why not when none."""

from __future__ import annotations

from ..config import ModelSettings
from ..records import SeriesRecord


def match_reason(record: SeriesRecord, model: ModelSettings) -> str:
    """Empty string when the series matches the model's rules, else why it does not."""
    rule = model.match
    if rule.modalities and record.modality not in rule.modalities:
        return f"modality {record.modality or '(none)'} not in {rule.modalities}"
    if rule.sop_class_uids and record.sop_class_uid not in rule.sop_class_uids:
        return f"SOP class {record.sop_class_uid} not in {rule.sop_class_uids}"
    if record.instances < rule.min_instances:
        return f"{record.instances} instance(s), fewer than {rule.min_instances}"
    if rule.calling_aets and record.calling_aet not in rule.calling_aets:
        return f"sender {record.calling_aet} not in {rule.calling_aets}"
    return ""


def route(record: SeriesRecord, models: list[ModelSettings]) -> tuple[list[str], str]:
    """Names of the models whose rules the series matches, and the skip reason when none do."""
    matched, reasons = [], []
    for model in models:
        reason = match_reason(record, model)
        if reason:
            reasons.append(f"{model.name}: {reason}")
        else:
            matched.append(model.name)
    return matched, "" if matched else "; ".join(reasons) or "no models configured"
