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
    try:
        return str(inspect.signature(obj)).replace("'", "")
    except (TypeError, ValueError):
        return "(...)"


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
            lines += [f"### `{cls.__module__}.{cls.__name__}`", "", "```python",
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


PAGES: dict[str, Callable[[], str]] = {
    "reference/cli.md": cli_page,
    "reference/model-api.md": model_api_page,
    "reference/conformance.md": conformance_page,
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
