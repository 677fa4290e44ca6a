"""One typed settings model: YAML file plus ``PACSWORKER__SECTION__KEY`` env overrides."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash


def _check_ae(value: str) -> str:
    if not value.strip() or not AE_TITLE_RE.match(value):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value


class TlsSettings(BaseModel):
    """DICOM TLS (PS3.15 B.1): a second listener that speaks DICOM inside TLS."""

    model_config = {"extra": "forbid"}

    port: int = Field(2762, ge=1, le=65535, description="the DICOM TLS port (2762 is IANA's dicom-tls)")
    certificate: Path = Field(description="the receiver's certificate chain (PEM)")
    private_key: Path = Field(description="its private key (PEM, unencrypted)")
    ca_certificates: Path | None = Field(None, description="CA certificates (PEM) that client certificates must chain to")
    require_client_certificate: bool = Field(False, description="refuse a peer without a certificate the CAs signed")
    handshake_timeout: float = Field(10.0, gt=0, description="seconds a connecting peer has to finish the TLS handshake")

    @model_validator(mode="after")
    def _verifiable(self) -> "TlsSettings":
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates to verify them against")
        return self


class ScpSettings(BaseModel):
    ae_title: str = "PACSWORKER"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    plain: bool = Field(True, description="listen without TLS on port; false: only the TLS port (with tls)")
    tls: TlsSettings | None = None
    stow_port: int | None = Field(None, ge=1, le=65535, description="DICOMweb STOW-RS in (POST /studies) on this port")
    stow_max_bytes: int = Field(2 << 30, ge=1 << 20, description="the largest STOW-RS request accepted")
    pull_url: str | None = Field(
        None, pattern=r"^https?://", description="the DICOMweb PACS that pull (WADO-RS) fetches studies from"
    )
    allowed_calling_aets: list[str] = Field(
        default_factory=list, description="empty: any calling AE title is accepted"
    )
    require_called_aet: bool = True
    series_quiet_seconds: float = Field(10.0, gt=0)
    complete_on_evidence: bool = Field(
        True, description="complete a series before its quiet time when the data says it is whole (one multi-frame "
        "instance; every one of a consistent Images in Acquisition count; every temporal position of a consistent "
        "Number of Temporal Positions with the same slices; a release by a sender named in complete_on_release)"
    )
    evidence_quiet_seconds: float = Field(1.0, ge=0, description="the quiet time that applies with such evidence")
    complete_on_release: list[str] = Field(
        default_factory=list, description="calling AE titles that send whole series per association: their "
        "release of an association completes the series it sent (after evidence_quiet_seconds)",
    )
    max_associations: int = Field(16, ge=1)
    network_timeout: float = Field(
        60.0, gt=0, description="seconds: a started PDU must arrive in full, an idle association is aborted"
    )
    acse_timeout: float = Field(30.0, gt=0, description="seconds to wait for the A-ASSOCIATE-RQ after connect")
    dimse_timeout: float = Field(60.0, gt=0, description="seconds to wait for a DIMSE message")
    max_pdu_length: int = Field(
        262144, ge=4096, le=16 << 20, description="bytes; advertised, and a longer P-DATA-TF aborts the association"
    )
    dataset_start_timeout: float = Field(
        2.0, gt=0, description="seconds between a C-STORE command and its first dataset fragment"
    )
    max_inflated_bytes: int = Field(
        4 << 30, ge=1 << 20, description="a deflated dataset that inflates to more is refused"
    )

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae(value)

    @model_validator(mode="after")
    def _listens(self) -> "ScpSettings":
        if not self.plain and self.tls is None:
            raise ValueError("plain: false needs tls: the receiver would listen nowhere")
        if self.tls is not None and self.plain and self.tls.port == self.port:
            raise ValueError(f"tls.port {self.tls.port} is the plain port too")
        return self

    @field_validator("allowed_calling_aets", "complete_on_release")
    @classmethod
    def _aets(cls, value: list[str]) -> list[str]:
        return [_check_ae(v) for v in value]


class StorageSettings(BaseModel):
    data_dir: Path = Path("./data")
    min_free_bytes: int = Field(
        256 << 20, ge=0, description="below this much free space on data_dir, instances are refused with "
        "0xA700 (Out of Resources) until space returns; 0: no reserve"
    )
    wait_for_data_dir_seconds: float = Field(
        300.0, ge=0, description="a worker waits this long for a data_dir that does not exist yet (a mount)"
    )


class QueueSettings(BaseModel):
    broker_url: str = Field("", description="empty: embedded filesystem broker under data_dir")
    result_backend: str = Field("", description="empty: SQLite file under data_dir")
    visibility_timeout: int = Field(6 * 3600, ge=60, description="seconds; longer than any job")
    job_soft_time_limit: int = Field(1800, ge=1, description="seconds")
    job_time_limit: int = Field(2400, ge=1, description="seconds")
    heartbeat_seconds: float = Field(5.0, gt=0)
    stale_after_seconds: float = Field(60.0, gt=0, description="a running job without heartbeat this long is re-queued")
    max_attempts: int = Field(3, ge=1)
    publish_timeout_seconds: float = Field(
        2.0, gt=0, description="longest wait for the broker when sending a job; unsent jobs are resent later"
    )
    delivery_max_retries: int = Field(20, ge=0)
    delivery_backoff_seconds: float = Field(5.0, gt=0)
    delivery_backoff_max_seconds: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _limits(self) -> "QueueSettings":
        if self.job_soft_time_limit >= self.job_time_limit:
            raise ValueError("queue.job_soft_time_limit must be lower than queue.job_time_limit")
        if self.visibility_timeout <= self.job_time_limit:
            raise ValueError("queue.visibility_timeout must be longer than queue.job_time_limit")
        return self


class MatchRule(BaseModel):
    modalities: list[str] = Field(default_factory=lambda: ["CT"])
    sop_class_uids: list[str] = Field(
        default_factory=lambda: ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"]
    )
    body_parts: list[str] = Field(default_factory=list, description="Body Part Examined, upper case; empty: any")
    mr_acquisition_types: list[str] = Field(default_factory=list, description="2D, 3D; empty: any")
    image_type: list[str] = Field(default_factory=list, description="values Image Type must all contain")
    series_description: str = Field("", description="regular expression the description must match")
    series_description_exclude: str = Field("", description="regular expression the description must not match")
    orientations: list[Literal["axial", "coronal", "sagittal", "oblique"]] = Field(default_factory=list)
    min_instances: int = Field(10, ge=1)
    max_instances: int = Field(0, ge=0, description="0: no maximum")
    calling_aets: list[str] = Field(default_factory=list, description="empty: any sender")

    @field_validator("series_description", "series_description_exclude")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
        return value

    @field_validator("body_parts", "mr_acquisition_types", "image_type")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [v.upper() for v in value]


CodeTriple = Annotated[list[str], Field(min_length=3, max_length=3, description="[scheme, value, meaning]")]


class SegmentConfig(BaseModel):
    """One label of a label map (or one channel of probability maps) and its DICOM description."""

    model_config = {"extra": "forbid", "populate_by_name": True}

    label: int = Field(ge=1, le=255)
    name: str = Field(min_length=1, max_length=64)
    category: CodeTriple = Field(default_factory=lambda: ["SCT", "85756007", "Tissue"])
    property_type: CodeTriple = Field(default_factory=lambda: ["SCT", "123037004", "Anatomical Structure"], alias="type")
    description: str = ""
    color: list[int] | None = Field(None, min_length=3, max_length=3, description="[r, g, b] 0..255 for viewers")


class OutputConfig(BaseModel):
    """What one named output of a model is: its kind, and its segments or coded name."""

    model_config = {"extra": "forbid"}

    kind: Literal["labelmap", "probabilities", "score", "classification", "boxes"]
    segments: list[SegmentConfig] = Field(default_factory=list)
    name: CodeTriple | None = None
    values: dict[str, CodeTriple] = Field(
        default_factory=dict, description="class value (classification) or box label (boxes) -> coded meaning"
    )

    @model_validator(mode="after")
    def _complete(self) -> "OutputConfig":
        if self.kind in ("labelmap", "probabilities") and not self.segments:
            raise ValueError(f"a {self.kind} output needs segments")
        if self.kind in ("score", "classification") and self.name is None:
            raise ValueError(f"a {self.kind} output needs a coded name [scheme, value, meaning]")
        return self


class TransformConfig(BaseModel):
    """One MONAI transform by class name, with its arguments (dictionary transforms get ``keys``)."""

    model_config = {"extra": "forbid"}

    name: str
    args: dict[str, Any] = Field(default_factory=dict)


class PipelineConfig(BaseModel):
    """Pre-transforms, an inferer and post-transforms around a network (kind torchscript)."""

    model_config = {"extra": "forbid"}

    pre: list[TransformConfig] = Field(default_factory=list)
    inferer: dict[str, Any] = Field(
        default_factory=lambda: {"name": "simple"},
        description="{name: simple} or {name: sliding_window, roi_size, overlap, sw_batch_size, mode}",
    )
    post: list[TransformConfig] = Field(default_factory=list)
    amp: bool = Field(True, description="mixed precision on CUDA")


class ReferenceCase(BaseModel):
    """A series with a known answer: ``models test`` (and a worker asked to) checks the model on it."""

    model_config = {"extra": "forbid"}

    input: Path = Field(description="folder of one series")
    expected_mask: Path | None = Field(None, description="NIfTI mask in the series' grid, as `pacsworker run` writes")
    min_dice: float = Field(0.98, gt=0, le=1)
    expected_volume_ml: dict[str, float] = Field(default_factory=dict, description="segment name -> mL")
    volume_tolerance: float = Field(0.02, ge=0, description="relative, 0.02 = 2 %")
    expected_values: dict[str, float] = Field(default_factory=dict, description="score output key -> value")
    value_tolerance: float = Field(0.01, ge=0, description="absolute")
    implausible: bool = Field(False, description="the case must fail the model's plausibility checks (a phantom)")

    @model_validator(mode="after")
    def _something_to_check(self) -> "ReferenceCase":
        if self.expected_mask is None and not self.expected_volume_ml and not self.expected_values and not self.implausible:
            raise ValueError("a reference case needs expected_mask, expected_volume_ml, expected_values or implausible")
        return self


class SegOptions(BaseModel):
    """How a model's maps become a DICOM SEG."""

    model_config = {"extra": "forbid"}

    labelmap_as: Literal["binary", "labelmap"] = Field(
        "binary", description="binary: what every viewer loads; labelmap: the compact LABELMAP SEG (opt-in)")
    probabilities_as: Literal["fractional", "binary"] = Field(
        "fractional", description="fractional: PROBABILITY SEG; binary: exclusive labels where >= threshold")
    threshold: float = Field(0.5, gt=0, lt=1)


class Range(BaseModel):
    """An inclusive range; either end may be open."""

    model_config = {"extra": "forbid"}

    min: float | None = None
    max: float | None = None

    def holds(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class CheckCondition(BaseModel):
    """Study-level facts a check applies to; a check with conditions applies only when the facts
    are known and match (an unknown age matches no age range)."""

    model_config = {"extra": "forbid"}

    age_months: Range | None = None
    sex: list[Literal["M", "F", "O"]] | None = None


class ResultCheck(BaseModel):
    """A bound on one measured fact of a model's result: a segment's ``volume_ml``, its number of
    connected ``components`` (26-connected), the ``fov_fraction`` of the volume it fills, or a
    score output's ``value``."""

    model_config = {"extra": "forbid"}

    segment: str | None = Field(None, description="segment name (volume_ml, components, fov_fraction)")
    output: str | None = Field(None, description="score output key (value)")
    measure: Literal["volume_ml", "components", "fov_fraction", "value"]
    min: float | None = None
    max: float | None = None
    when: CheckCondition | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "ResultCheck":
        if (self.segment is None) == (self.output is None):
            raise ValueError("a check names either a segment or a score output")
        if (self.measure == "value") != (self.output is not None):
            raise ValueError("'value' bounds a score output; volume_ml, components and fov_fraction bound a segment")
        if self.min is None and self.max is None:
            raise ValueError("a check needs min, max or both")
        return self

    def describe(self) -> str:
        subject = self.segment or self.output
        return f"{subject} {self.measure}"


class InputCheck(BaseModel):
    """A check on the input before the model runs. ``head_like``: the image's foreground (above an
    Otsu threshold) varies in intensity as tissues do (coefficient of variation at least
    ``min_variation``; a phantom's fill is uniform) and spans a head's size (largest extent,
    1st to 99th percentile of the foreground along each axis, within ``extent_mm``)."""

    model_config = {"extra": "forbid"}

    kind: Literal["head_like"]
    min_variation: float = Field(0.2, ge=0)
    extent_mm: Range = Field(default_factory=lambda: Range(min=100, max=320))


class PlausibilityChecks(BaseModel):
    """What must hold for a result to be delivered as it is, and what happens when it does not:
    ``withhold`` (nothing goes to the PACS; the job ends as implausible with the reasons) or
    ``flag`` (delivered, marked as failing the checks in the SR and the series descriptions)."""

    model_config = {"extra": "forbid"}

    on_fail: Literal["withhold", "flag"] = "withhold"
    inputs: list[InputCheck] = Field(default_factory=list)
    results: list[ResultCheck] = Field(default_factory=list)


# sensible defaults of the built-in models; a model's own ``checks:`` replaces them
BUILTIN_CHECKS = {
    "mr-brain": PlausibilityChecks(
        inputs=[InputCheck(kind="head_like")],
        results=[
            # adult brains (with the CSF inside the skull) are about 1.0-1.8 L; children's are
            # smaller: above 2 years of age at least 0.8 L, from birth at least 0.25 L
            ResultCheck(segment="Brain", measure="volume_ml", min=250, max=2100),
            ResultCheck(segment="Brain", measure="volume_ml", min=800, when=CheckCondition(age_months=Range(min=24))),
            ResultCheck(segment="Brain", measure="volume_ml", max=1600, when=CheckCondition(age_months=Range(max=12))),
            ResultCheck(segment="Brain", measure="components", max=3),
            ResultCheck(segment="Brain", measure="fov_fraction", max=0.6),
        ],
    ),
    "ct-body": PlausibilityChecks(
        results=[
            ResultCheck(segment="Body", measure="fov_fraction", max=0.95),  # all of the field: not a body
            ResultCheck(segment="Bone", measure="fov_fraction", max=0.5),
            ResultCheck(segment="Lungs", measure="volume_ml", max=12000),  # adult total lung capacity is 4-8 L
        ],
    ),
}


class ModelSettings(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    kind: Literal["builtin", "python", "torchscript", "monai-bundle", "triton", "arterys", "monai-deploy"] = "builtin"
    source: str = Field(
        "ct-body",
        description="builtin: the model's name; python: 'package.module:Class' or '/path/file.py:Class'; "
        "torchscript: the .ts/.pt file; monai-bundle: the bundle directory; monai-deploy: the application "
        "(a .py file or package folder with an Application subclass); triton, arterys: unused",
    )
    url: str | None = Field(
        None, description="triton: http://host:port or grpc://host:port; arterys: the model server's base URL"
    )
    model_name: str | None = Field(None, description="triton: the model's name on the server")
    model_version: str = Field("", description="triton: a version on the server; empty: the server's choice")
    inference_command: Literal["get-probability-mask", "get-bounding-box-2d"] = Field(
        "get-probability-mask", description="arterys: what the model server is asked for"
    )
    request_timeout_seconds: float = Field(300.0, gt=0, description="triton, arterys: one request's time limit")
    wait_seconds: float = Field(
        300.0, ge=0, description="triton, arterys: how long a job waits for an unreachable server or a model "
        "that is not ready before it fails"
    )
    command: str | None = Field(
        None, description="monai-deploy: a command template for a packaged application (MAP), with {input}, "
        "{output} and {model}; instead of source"
    )
    model_path: Path | None = Field(None, description="monai-deploy: the model file or folder the application reads")
    pipeline: PipelineConfig | str | None = Field(None, description="torchscript: inline, or a YAML file")
    version: str = Field("", description="written into results; default: the class's `version` or 0")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the model class")
    outputs: dict[str, OutputConfig] = Field(default_factory=dict, description="output key -> what it is")
    match: MatchRule = Field(default_factory=MatchRule)
    tests: list[ReferenceCase] = Field(default_factory=list, description="reference cases with known answers")
    seg: SegOptions = Field(default_factory=SegOptions)
    checks: PlausibilityChecks | None = Field(
        None, description="plausibility checks; default: the built-in model's own, else none"
    )

    def effective_checks(self) -> PlausibilityChecks:
        """The configured checks, else the built-in model's defaults, else none."""
        if self.checks is not None:
            return self.checks
        if self.kind == "builtin":
            return BUILTIN_CHECKS.get(self.source, PlausibilityChecks())
        return PlausibilityChecks()

    def fingerprint(self) -> str:
        """Names what the model computes (kind, source, version, options, outputs, pipeline): a new
        version or other options make a new job for the same series, and so a re-run."""
        import hashlib

        text = self.model_dump_json(include={"kind", "source", "version", "options", "outputs", "pipeline", "seg"})
        served = self.model_dump_json(exclude_defaults=True, include={
            "url", "model_name", "model_version", "inference_command", "command", "model_path"})
        if served != "{}":  # model servers' settings; absent for the other kinds, whose names stay as they were
            text += served
        return hashlib.sha256(text.encode()).hexdigest()[:8]


MR_IMAGE_CLASSES = ["1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"]  # MR, Enhanced MR


def brain_extra_installed() -> bool:
    """Whether the optional ``brain`` extra (deepbet) is importable, without importing it."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("deepbet", "cc3d", "fill_voids"))


def default_models() -> list[ModelSettings]:
    """ct-body, and mr-brain when its extra is installed: what runs with no ``models`` configured."""
    models = [ModelSettings(name="ct-body")]
    if brain_extra_installed():
        models.append(ModelSettings(
            name="mr-brain", kind="builtin", source="mr-brain",
            match=MatchRule(
                modalities=["MR"], sop_class_uids=MR_IMAGE_CLASSES, body_parts=["BRAIN", "HEAD"],
                mr_acquisition_types=["3D"], image_type=["ORIGINAL"], min_instances=1,
                # 3D T1-weighted only: other 3D contrasts of the head are left alone
                series_description_exclude=r"(?i)flair|t2|dwi|diff|adc|swi|tof|angio|perf|space|cube",
            ),
        ))
    return models


class BasicAuth(BaseModel):
    kind: Literal["basic"] = "basic"
    username: str
    password: str


class DicomwebDestination(BaseModel):
    kind: Literal["dicomweb"]
    name: str = "dicomweb"
    url: str = Field(pattern=r"^https?://")
    auth: BasicAuth | None = None
    timeout_seconds: float = Field(60.0, gt=0)


class FolderDestination(BaseModel):
    kind: Literal["folder"]
    name: str = "folder"
    path: Path


Destination = Annotated[DicomwebDestination | FolderDestination, Field(discriminator="kind")]


class LoggingSettings(BaseModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Settings(BaseSettings):
    """Everything pacsworker reads at start-up; validated once, then passed around."""

    model_config = SettingsConfigDict(
        env_prefix="PACSWORKER__", env_nested_delimiter="__", extra="forbid"
    )

    scp: ScpSettings = Field(default_factory=ScpSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    models: list[ModelSettings] = Field(default_factory=default_models)
    destinations: list[Destination] = Field(default_factory=list)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @field_validator("models")
    @classmethod
    def _unique_models(cls, value: list[ModelSettings]) -> list[ModelSettings]:
        names = [m.name for m in value]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # env beats the YAML file (passed as init kwargs)
        return env_settings, init_settings

    @property
    def data_dir(self) -> Path:
        return self.storage.data_dir.resolve()

    def effective_destinations(self) -> list[DicomwebDestination | FolderDestination]:
        if self.destinations:
            return list(self.destinations)
        return [FolderDestination(kind="folder", name="results", path=self.data_dir / "results")]

    def model(self, name: str) -> ModelSettings:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(f"no model named {name!r} in the configuration")


class ConfigError(Exception):
    """The configuration file or environment holds an invalid value."""


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


CONFIG_ENV = "PACSWORKER_CONFIG"


def load_settings(path: Path | str | None = None) -> Settings:
    """Load settings from a YAML file (or ``$PACSWORKER_CONFIG``) and the environment.

    Raises
    ------
    ConfigError
        With one line per invalid key: the dotted key, what was expected, what was given.
    """
    path = path or os.environ.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    origin = "defaults and environment"
    if path:
        file = Path(path)
        origin = f"{file} and environment"
        try:
            loaded = yaml.safe_load(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"configuration file {file} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"configuration file {file} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"configuration file {file} must hold a mapping at top level")
        data = loaded or {}
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin)) from None
