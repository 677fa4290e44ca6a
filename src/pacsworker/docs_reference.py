"""Reference pages generated from the code, so that they cannot drift from it: every command and
option (from the CLI itself), the model API (signatures and docstrings of the output classes and
``Series``) and the DICOM Conformance Statement's tables (from the receiver's own presentation
contexts). Regenerate them all with::

    .venv/bin/python -m pacsworker.docs_reference

``tests/test_docs.py`` fails when a file differs from what this writes.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REGENERATE = ".venv/bin/python -m pacsworker.docs_reference"
BANNER = f"<!-- generated from the code; do not edit: run `{REGENERATE}` -->"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _commands(group: Any, prefix: str) -> list[tuple[str, Any]]:
    found = []
    for name, command in sorted(group.commands.items()):
        if getattr(command, "hidden", False):
            continue
        path = f"{prefix} {name}"
        found.append((path, command))
        if hasattr(command, "commands"):
            found += _commands(command, path)
    return found


def cli_page() -> str:
    """Every command, its help and its options, as ``pacsworker COMMAND --help`` gives them."""
    import typer

    from .cli import app

    root = typer.main.get_command(app)
    lines = [BANNER, "", "# Commands", "",
             "Every command of `pacsworker`, with its options as `pacsworker COMMAND --help` prints them. "
             "Each command reads the configuration from `--config`, else `$PACSWORKER_CONFIG`, else the "
             "built-in defaults (see [the configuration reference](../configuration.md)).", ""]
    for path, command in _commands(root, "pacsworker"):
        context = command.context_class(command, info_name=path.rsplit(" ", 1)[-1])
        usage = " ".join(command.collect_usage_pieces(context))
        lines += [f"## `{path}`", "", inspect.cleandoc(command.help or ""), ""]
        if hasattr(command, "commands"):
            lines += ["Subcommands: " + ", ".join(f"`{name}`" for name in sorted(command.commands)) + ".", ""]
            continue
        lines += ["```", f"{path} {usage}", "```", ""]
        records = [param.get_help_record(context) for param in command.params]
        records = [record for record in records if record]
        if records:
            lines += ["| argument or option | what it does |", "|---|---|"]
            lines += [f"| `{_cell(names)}` | {_cell(text)} |" for names, text in records]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _signature(obj) -> str:
    """``(name: type = default, ...) -> type`` with the annotations as written (they are strings here)."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    parts, keyword_only = [], False
    for parameter in signature.parameters.values():
        if parameter.kind == parameter.KEYWORD_ONLY and not keyword_only:
            parts.append("*")
            keyword_only = True
        text = parameter.name if parameter.annotation is parameter.empty else f"{parameter.name}: {parameter.annotation}"
        if parameter.default is not parameter.empty:
            text += f" = {parameter.default!r}"
        parts.append(text)
    returned = "" if signature.return_annotation in (signature.empty, "None", None) else f" -> {signature.return_annotation}"
    return f"({', '.join(parts)}){returned}"


def _members(cls: type) -> list[tuple[str, Any]]:
    """The public methods and properties a class defines itself, in the order of its source."""
    found: list[tuple[str, Any]] = []
    for name, value in vars(cls).items():
        if name.startswith("_") or name in getattr(cls, "__dataclass_fields__", {}):
            continue
        if isinstance(value, (property, staticmethod, classmethod)) or inspect.isfunction(value):
            found.append((name, value))
    return found


def _doc(obj) -> str:
    """A numpy-style docstring as Markdown: section titles in bold, ``name:`` entries as list items."""
    lines = inspect.cleandoc(inspect.getdoc(obj) or "").splitlines()
    out: list[str] = []
    for i, line in enumerate(lines):
        if re.fullmatch(r"-{3,}", line.strip()) and out:
            out[-1] = f"**{out[-1].strip()}**\n"
        elif re.fullmatch(r"[A-Za-z_][\w ,*]*:?( : .*)?", line) and i + 1 < len(lines) and lines[i + 1].startswith("    "):
            out.append(f"- `{line.rstrip(':')}`:")
        elif line.startswith("    ") and out and out[-1].startswith("- "):
            out[-1] += " " + line.strip()
        else:
            out.append(line)
    return "\n".join(out).replace("``", "`")


def model_api_page() -> str:
    """The classes a model meets: ``Series`` and ``Study`` (its input) and the output classes."""
    from .worker import outputs, series

    inputs = [series.Series, series.Study]
    results = [outputs.ModelResult, outputs.LabelMap, outputs.ProbabilityMaps, outputs.SegmentSpec, outputs.CodedTerm,
               outputs.Score, outputs.Classification, outputs.Box, outputs.Boxes, outputs.DicomObjects,
               outputs.ModelOutputError, outputs.ModelRunError]
    lines = [BANNER, "", "# Model API", "",
             "What a model written as a Python class receives and may return (`kind: python`; the other kinds "
             "map their outputs onto the same classes). The signatures and texts below are the code's own.", ""]
    for title, classes in (("Input", inputs), ("Outputs", results)):
        lines += [f"## {title}", ""]
        for cls in classes:
            lines += [f"### `{cls.__module__}.{cls.__name__}`", "", "```python signature",
                      f"{cls.__name__}{_signature(cls)}", "```", "", _doc(cls), ""]
            members = _members(cls)
            plain = [name for name, member in members if isinstance(member, property) and not _doc(member.fget)]
            if plain:
                lines += ["Properties: " + ", ".join(f"`{name}`" for name in plain) + ".", ""]
            for name, member in members:
                if isinstance(member, property):
                    if name not in plain:
                        lines += [f"- **`{name}`** (property): {_cell(_doc(member.fget))}"]
                else:
                    function = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
                    lines += [f"- **`{name}{_signature(function)}`**: {_cell(_doc(function))}"]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID

    return UID(uid).name


def conformance_tables() -> dict[str, str]:
    """The tables of the Conformance Statement that come from the code: the SOP classes and transfer
    syntaxes the receiver accepts, what it proposes when it sends results, its identity and defaults."""
    from pynetdicom import DEFAULT_TRANSFER_SYNTAXES, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
    from pynetdicom.presentation import AllStoragePresentationContexts

    from .config import ScpSettings
    from .destinations.dimse import DELIVERED_WARNINGS
    from .scp.server import ACCEPTED_TRANSFER_SYNTAXES

    scp = ScpSettings()
    storage = sorted({str(cx.abstract_syntax) for cx in AllStoragePresentationContexts},
                     key=lambda uid: _uid_name(uid).lower())
    tables = {
        "storage_classes": "\n".join(["| SOP Class | UID | role |", "|---|---|---|"]
                                     + [f"| {_uid_name(uid)} | `{uid}` | SCP |" for uid in storage]
                                     + ["| Verification | `1.2.840.10008.1.1` | SCP |"]),
        "transfer_syntaxes": "\n".join(["| Transfer Syntax | UID |", "|---|---|"]
                                       + [f"| {_uid_name(ts)} | `{ts}` |" for ts in ACCEPTED_TRANSFER_SYNTAXES]),
        "identity": "\n".join([
            "| item | value |", "|---|---|",
            f"| Implementation Class UID | `{PYNETDICOM_IMPLEMENTATION_UID}` |",
            f"| Implementation Version Name | `{PYNETDICOM_IMPLEMENTATION_VERSION}` |",
            f"| AE title (default, `scp.ae_title`) | `{scp.ae_title}` |",
            f"| port (default, `scp.port`) | {scp.port} (DICOM TLS: `scp.tls.port`, default 2762) |",
            f"| maximum PDU length received (default, `scp.max_pdu_length`) | {scp.max_pdu_length} |",
            f"| associations at once (default, `scp.max_associations`) | {scp.max_associations} |",
            f"| ACSE / DIMSE / network timeouts (defaults) | {scp.acse_timeout:g} s / {scp.dimse_timeout:g} s / "
            f"{scp.network_timeout:g} s |",
        ]),
        "storage_count": str(len(storage)),
        "verification_syntaxes": ", ".join(_uid_name(ts) for ts in DEFAULT_TRANSFER_SYNTAXES),
        "delivered_warnings": ", ".join(f"`0x{status:04X}`" for status in sorted(DELIVERED_WARNINGS)),
    }
    return tables


CONFORMANCE_TEMPLATE = Path(__file__).with_name("conformance_template.md")


def conformance_page() -> str:
    text = CONFORMANCE_TEMPLATE.read_text()
    for key, table in conformance_tables().items():
        text = text.replace(f"{{{{{key}}}}}", table)
    return f"{BANNER}\n\n{text.rstrip()}\n"


# what each attribute of a result is and where its value comes from (the annotated dump's right column)
RESULT_NOTES = {
    "SpecificCharacterSet": "the source's",
    "ImageType": "DERIVED\\PRIMARY: made from the source images",
    "SOPClassUID": "Segmentation Storage / Comprehensive 3D SR Storage",
    "SOPInstanceUID": "deterministic: from the source series, the model's fingerprint and the result's role",
    "InstanceCreationDate": "the source's newest Content Date (never the clock: a re-run gives the same bytes)",
    "InstanceCreationTime": "the source's newest Content Time",
    "StudyDate": "patient and study attributes: copied from the source",
    "SeriesDate": "as InstanceCreationDate",
    "ContentDate": "as InstanceCreationDate",
    "SeriesTime": "as InstanceCreationTime",
    "ContentTime": "as InstanceCreationTime",
    "Modality": "SEG / SR",
    "Manufacturer": "pacsworker",
    "SeriesDescription": "the model, the result and the source series",
    "ManufacturerModelName": "the model's name",
    "SoftwareVersions": "pacsworker's version and the model's",
    "ContributingEquipmentSequence": "the source's equipment and pacsworker, which made the result",
    "SeriesInstanceUID": "deterministic, a new series per source series and model",
    "SeriesNumber": "source series N: N x 100 + 3k + 1 (SEG), + 2 (measurement SR), + 3 (image SR); k from the model's name",
    "InstanceNumber": "1",
    "FrameOfReferenceUID": "the source's",
    "ReferencedSeriesSequence": "the source series and every instance the result was made from",
    "SourceImageSequence": "every source image",
    "DimensionOrganizationSequence": "frames organised by segment, then position",
    "DimensionIndexSequence": "Referenced Segment Number, Image Position (Patient)",
    "NumberOfFrames": "one frame per segment and source slice it has voxels on",
    "Rows": "the source's", "Columns": "the source's",
    "SegmentationType": "BINARY (label maps); FRACTIONAL for probabilities",
    "SegmentSequence": "one item per segment: number, label, coded category and type, algorithm, display colour",
    "SegmentsOverlap": "NO: each voxel belongs to one segment",
    "ContentLabel": "a code string naming the content",
    "ContentDescription": "the model, its version and what the object is",
    "PositionReferenceIndicator": "the source's (often empty)",
    "SamplesPerPixel": "one sample: a segment's frame is a mask",
    "PhotometricInterpretation": "MONOCHROME2",
    "BitsAllocated": "1 bit per pixel (BINARY), 8 (FRACTIONAL)",
    "BitsStored": "as BitsAllocated", "HighBit": "BitsStored - 1", "PixelRepresentation": "unsigned",
    "LossyImageCompression": "00: never lossy",
    "PresentationLUTShape": "IDENTITY",
    "ContinuityOfContent": "SEPARATE: the items stand apart",
    "PreliminaryFlag": "FINAL",
    "ContentCreatorName": "pacsworker^<model>",
    "SharedFunctionalGroupsSequence": "pixel spacing, slice thickness and orientation: the source's",
    "PerFrameFunctionalGroupsSequence": "per frame: the source image it is derived from, its position, its segment",
    "ValueType": "CONTAINER: the root of the content tree",
    "ConceptNameCodeSequence": "Imaging Measurement Report (126000, DCM)",
    "ContentTemplateSequence": "TID 1500",
    "CurrentRequestedProcedureEvidenceSequence": "the source instances and the SEG",
    "CompletionFlag": "COMPLETE", "VerificationFlag": "UNVERIFIED: made by a machine, not signed by a person",
    "ContentSequence": "the measurement report, below",
}
PATIENT_STUDY = {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyDescription",
                 "ReferringPhysicianName", "StudyID", "StudyInstanceUID", "StudyDate", "StudyTime", "DeviceSerialNumber",
                 "ReferencedPerformedProcedureStepSequence", "PerformedProcedureCodeSequence"}
RESULT_SERIES = "ct02_philips_ingenuity_headphantom_5mm"


def _value(element) -> str:
    if element.VR == "SQ":
        return f"{len(element.value)} item(s)"
    if element.VR == "UI":
        return f"`{element.value}`" if str(element.value).startswith("1.2.840.10008") else "(a UID)"
    text = str(element.value)
    return _cell(text if len(text) <= 60 else text[:57] + "...")


def _content_tree(items, depth: int = 0) -> list[str]:
    """An SR content tree, one line per item: relationship, value type, concept name and value."""
    lines = []
    for item in items:
        name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        kind, value = item.ValueType, ""
        if kind == "CODE":
            value = item.ConceptCodeSequence[0].CodeMeaning
        elif kind == "NUM":
            measured = item.MeasuredValueSequence[0]
            value = f"{float(measured.NumericValue):.1f} {measured.MeasurementUnitsCodeSequence[0].CodeValue}"
        elif kind == "TEXT":
            value = item.TextValue
        elif kind in ("UIDREF", "IMAGE", "COMPOSITE"):
            value = "(a reference)"
        elif kind in ("SCOORD", "SCOORD3D"):
            value = f"{item.GraphicType}, {len(item.GraphicData) // (2 if kind == 'SCOORD' else 3)} points"
        relationship = item.get("RelationshipType", "")
        head = f"{relationship} {kind} {name}".strip()
        lines.append("  " * depth + head + (f": {value}" if value else ""))
        if "ContentSequence" in item:
            lines += _content_tree(item.ContentSequence, depth + 1)
    return lines


def results_page() -> str:
    """What a result holds: the attributes of a real SEG and SR, made by the built-in ct-body model from
    a CT series of the test data, each with what it is and where it comes from."""
    import os

    from .config import ModelSettings
    from .worker.runtime import run_model

    data = Path(os.environ.get("PACSWORKER_TEST_DICOM", Path(__file__).resolve().parents[3] / "shared" / "dicom"))
    files = sorted((data / RESULT_SERIES).glob("*.dcm"))
    if not files:
        raise FileNotFoundError(f"{data / RESULT_SERIES}: the results page is made from this series "
                                "(set PACSWORKER_TEST_DICOM to the test DICOM folder)")
    objects = run_model(files, ModelSettings(name="ct-body")).result_objects()
    lines = [BANNER, "", "# Result objects", "",
             "What pacsworker sends back for a series: a DICOM Segmentation and a TID 1500 measurement report "
             "(Comprehensive 3D SR), and an image SR when there are lengths or boxes. Below, the attributes "
             f"of a real result: the built-in `ct-body` model on a 28-slice head CT phantom (`{RESULT_SERIES}` of "
             "the test data), made by `pacsworker run`'s code. UIDs other than standard ones are shown as "
             "`(a UID)`; patient and study attributes are copied from the source and not shown; numbers in "
             "the content tree are rounded to one decimal.", ""]
    titles = {"seg.dcm": "Segmentation (`seg.dcm`)", "sr.dcm": "Measurement report (`sr.dcm`)",
              "image_sr.dcm": "Image SR (`image_sr.dcm`): lengths on the images"}
    for name, ds in objects.items():
        lines += [f"## {titles.get(name, name)}", "", "| attribute | tag | value here | what it is |", "|---|---|---|---|"]
        for element in ds:
            if element.keyword in PATIENT_STUDY or element.keyword in ("PixelData", ""):
                continue
            lines.append(f"| {element.keyword} | ({element.tag.group:04X},{element.tag.element:04X}) | "
                         f"{_value(element)} | {_cell(RESULT_NOTES.get(element.keyword, ''))} |")
        lines.append("")
        if "SegmentSequence" in ds:
            lines += ["Segments:", "", "| # | label | category | type | algorithm | colour (CIELab) |",
                      "|---|---|---|---|---|---|"]
            for segment in ds.SegmentSequence:
                lines.append(
                    f"| {segment.SegmentNumber} | {segment.SegmentLabel} | "
                    f"{segment.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning} | "
                    f"{segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning} | "
                    f"{segment.SegmentAlgorithmType} {segment.get('SegmentAlgorithmName', '')} | "
                    f"{list(segment.get('RecommendedDisplayCIELabValue', []))} |")
            lines.append("")
        if "ContentSequence" in ds:
            lines += ["Content tree:", "", "```text", *_content_tree([ds]), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


PAGES: dict[str, Callable[[], str]] = {
    "reference/cli.md": cli_page,
    "reference/model-api.md": model_api_page,
    "reference/conformance.md": conformance_page,
    "reference/results.md": results_page,
}


def write_all(docs: Path) -> list[Path]:
    written = []
    for name, render in PAGES.items():
        path = docs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render())
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs")
    for page in write_all(target):
        print(page)
