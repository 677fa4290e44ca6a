"""One typed settings model: YAML file plus ``PACSWORKER__SECTION__KEY`` env overrides."""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
import urllib.parse
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash


def _check_ae(value: str) -> str:
    if not value.strip() or not AE_TITLE_RE.match(value):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value


class TlsCertificates(BaseModel):
    """TLS on a listener: the server's certificate and key, and the CAs that client certificates must chain to."""

    model_config = {"extra": "forbid"}

    certificate: Path = Field(description="the receiver's certificate chain (PEM)")
    private_key: Path = Field(description="its private key (PEM, unencrypted)")
    ca_certificates: Path | None = Field(None, description="CA certificates (PEM) that client certificates must chain to")
    require_client_certificate: bool = Field(False, description="refuse a peer without a certificate the CAs signed")
    handshake_timeout: float = Field(10.0, gt=0, description="seconds a connecting peer has to finish the TLS handshake")

    @model_validator(mode="after")
    def _verifiable(self) -> TlsCertificates:
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates to verify them against")
        return self


class TlsSettings(TlsCertificates):
    """DICOM TLS (PS3.15 B.1): a second listener that speaks DICOM inside TLS."""

    port: int = Field(2762, ge=1, le=65535, description="the DICOM TLS port (2762 is IANA's dicom-tls)")


class HttpLimits(BaseModel):
    """What one HTTP door (STOW-RS in, the operator port) gives its peers: connections, requests, time."""

    model_config = {"extra": "forbid"}

    max_connections: int = Field(
        256, ge=1, description="open connections at once; one more is answered 503 and closed at once"
    )
    max_requests: int = Field(32, ge=1, description="requests served at once; more are answered 503")
    header_timeout: float = Field(
        10.0, gt=0, description="seconds from a connection's start (or its previous answer) until a request's head "
        "has arrived whole; a slower peer is cut"
    )
    body_timeout: float = Field(60.0, gt=0, description="seconds a request body may stall; a stalled body is cut")
    keep_alive_timeout: float = Field(5.0, gt=0, description="seconds an idle kept-alive connection stays open")


class ScpSettings(BaseModel):
    model_config = {"extra": "forbid"}

    ae_title: str = Field("PACSWORKER", description="the receiver's AE title: the called AE title senders use")
    host: str = Field("0.0.0.0", description="address to listen on; 0.0.0.0: every interface")
    port: int = Field(11112, ge=1, le=65535, description="the DICOM (DIMSE) port; below 1024 needs a privilege")
    plain: bool = Field(True, description="listen without TLS on port; false: only the TLS port (with tls)")
    tls: TlsSettings | None = None
    stow_port: int | None = Field(None, ge=1, le=65535, description="DICOMweb STOW-RS in (POST /studies) on this port")
    stow_max_bytes: int = Field(2 << 30, ge=1 << 20, description="the largest STOW-RS request accepted")
    stow_auth: StowAuth = Field(
        default_factory=lambda: OpenDoor(kind="none"),
        description="who may use STOW-RS and POST /pull: none (anyone who reaches the port), basic, bearer or oauth2",
    )
    stow_tls: TlsCertificates | None = Field(None, description="HTTPS on stow_port (STOW-RS and pull); none: plain HTTP")
    stow_limits: HttpLimits = Field(default_factory=HttpLimits, description="connections, requests and timeouts")
    pull_url: str | None = Field(
        None, pattern=r"^https?://", description="the DICOMweb PACS that pull (WADO-RS) fetches studies from"
    )
    pull_auth: HttpAuth | None = Field(
        None, description="how pull signs in to pull_url, as a dicomweb destination's auth: none (default), basic, "
        "bearer or oauth2"
    )
    pull_tls: ClientTlsSettings = Field(
        default_factory=lambda: ClientTlsSettings(), description="https pull_url: CA bundle and client certificate"
    )
    allowed_calling_aets: list[str] = Field(
        default_factory=list, description="empty: any calling AE title is accepted"
    )
    require_called_aet: bool = Field(True, description="reject an association whose called AE title is not ae_title")
    series_quiet_seconds: float = Field(
        10.0, gt=0, description="a series is complete after this many seconds without a new instance"
    )
    complete_on_evidence: bool = Field(
        True, description="complete a series before its quiet time when the data says it is whole (one multi-frame "
        "instance; every one of a consistent Images in Acquisition count; every temporal position of a consistent "
        "Number of Temporal Positions with the same slices; a release by a sender named in complete_on_release)"
    )
    evidence_quiet_seconds: float = Field(1.0, ge=0, description="the quiet time that applies with such evidence")
    study_quiet_seconds: float = Field(
        60.0, gt=0, description="models with scope: study run once every series of the study is complete and no "
        "instance of it arrived for this long"
    )
    complete_on_release: list[str] = Field(
        default_factory=list, description="calling AE titles that send whole series per association: their "
        "release of an association completes the series it sent (after evidence_quiet_seconds)",
    )
    max_associations: int = Field(16, ge=1, description="associations served at once; more are rejected")
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
    fast_path: bool = Field(
        True, description="serve well-formed C-STOREs straight from their PDUs (about a third of the CPU time per "
        "instance); false: every C-STORE through pynetdicom's own path, with the same checks and answers"
    )

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae(value)

    @field_validator("pull_url")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        if value is not None and urllib.parse.urlsplit(value).username is not None:
            raise ValueError("credentials may not be part of pull_url: give them in pull_auth (from env or a file)")
        return value

    @model_validator(mode="after")
    def _listens(self) -> ScpSettings:
        if not self.plain and self.tls is None:
            raise ValueError("plain: false needs tls: the receiver would listen nowhere")
        if self.tls is not None and self.plain and self.tls.port == self.port:
            raise ValueError(f"tls.port {self.tls.port} is the plain port too")
        if self.stow_tls is not None and self.stow_port is None:
            raise ValueError("stow_tls needs stow_port: there is no STOW-RS port to serve over HTTPS")
        return self

    @field_validator("allowed_calling_aets", "complete_on_release")
    @classmethod
    def _aets(cls, value: list[str]) -> list[str]:
        return [_check_ae(v) for v in value]


class StorageSettings(BaseModel):
    model_config = {"extra": "forbid"}

    data_dir: Path = Field(
        Path("./data"), description="spool, records, outbox (and the embedded broker); every process must see it at "
        "the same path"
    )
    min_free_bytes: int = Field(
        256 << 20, ge=0, description="below this much free space on data_dir, instances are refused with "
        "0xA700 (Out of Resources) until space returns; 0: no reserve"
    )
    wait_for_data_dir_seconds: float = Field(
        300.0, ge=0, description="a worker waits this long for a data_dir that does not exist yet (a mount)"
    )
    retention_days: float = Field(
        7.0, gt=0, description="pacsworker cleanup removes finished series and delivered results older than this"
    )
    database_url: str = Field(
        "", pattern=r"^$|^(postgresql|postgres|postgresql\+psycopg|sqlite)://",
        description="the ledger (series, jobs, deliveries, history): empty: a SQLite file data_dir/ledger.sqlite3 "
        "(one host); postgresql://user@host/db for roles on several hosts (the password from PGPASSWORD or "
        "~/.pgpass, never here)",
    )
    history_days: float = Field(
        90.0, gt=0, description="pacsworker cleanup removes the ledger's history events older than this"
    )

    @field_validator("database_url")
    @classmethod
    def _no_password(cls, value: str) -> str:
        if value and urllib.parse.urlsplit(value).password is not None:
            raise ValueError("a password may not be part of database_url: give it in PGPASSWORD or ~/.pgpass")
        return value


class QueueSettings(BaseModel):
    model_config = {"extra": "forbid"}

    broker_url: str = Field("", description="empty: embedded filesystem broker under data_dir")
    result_backend: str = Field(
        "", description="empty: the broker's Redis URL, or with the embedded broker a SQLite file under data_dir"
    )
    visibility_timeout: int = Field(6 * 3600, ge=60, description="seconds; longer than any job")
    job_soft_time_limit: int = Field(1800, ge=1, description="seconds")
    job_time_limit: int = Field(2400, ge=1, description="seconds")
    heartbeat_seconds: float = Field(5.0, gt=0, description="how often a running job refreshes its record")
    stale_after_seconds: float = Field(60.0, gt=0, description="a running job without heartbeat this long is re-queued")
    max_attempts: int = Field(3, ge=1, description="a job whose worker was lost this many times is marked failed")
    event_queue_expires_seconds: float = Field(
        60.0, gt=0, description="a monitor's (Flower's) event queue unread this long is removed; the embedded broker "
        "has workers do it, Redis expires it by itself"
    )
    publish_timeout_seconds: float = Field(
        2.0, gt=0, description="longest wait for the broker when sending a job; unsent jobs are resent later"
    )
    delivery_max_retries: int = Field(20, ge=0, description="unused: delivery.max_age_seconds bounds retries")
    delivery_backoff_seconds: float = Field(
        5.0, gt=0, description="older name of delivery.backoff_base_seconds, used when that is not set")
    delivery_backoff_max_seconds: float = Field(
        600.0, gt=0, description="older name of delivery.backoff_max_seconds, used when that is not set")

    @model_validator(mode="after")
    def _limits(self) -> QueueSettings:
        if self.job_soft_time_limit >= self.job_time_limit:
            raise ValueError("queue.job_soft_time_limit must be lower than queue.job_time_limit")
        if self.visibility_timeout <= self.job_time_limit:
            raise ValueError("queue.visibility_timeout must be longer than queue.job_time_limit")
        return self


# The image storage SOP classes of each Modality: what a rule that names modalities accepts unless it
# lists sop_class_uids. Never SEG, SR, secondary capture or presentation states: results and screenshots.
# Written out, so that loading the settings (every command) does not import pydicom; tests/test_config.py
# holds each UID to pydicom.uid's value of the name beside it.
IMAGE_STORAGE_CLASSES: dict[str, tuple[str, ...]] = {
    "CT": (
        "1.2.840.10008.5.1.4.1.1.2",  # CTImageStorage
        "1.2.840.10008.5.1.4.1.1.2.1",  # EnhancedCTImageStorage
        "1.2.840.10008.5.1.4.1.1.2.2",  # LegacyConvertedEnhancedCTImageStorage
    ),
    "MR": (
        "1.2.840.10008.5.1.4.1.1.4",  # MRImageStorage
        "1.2.840.10008.5.1.4.1.1.4.1",  # EnhancedMRImageStorage
        "1.2.840.10008.5.1.4.1.1.4.3",  # EnhancedMRColorImageStorage
        "1.2.840.10008.5.1.4.1.1.4.4",  # LegacyConvertedEnhancedMRImageStorage
    ),
    "PT": (
        "1.2.840.10008.5.1.4.1.1.128",  # PositronEmissionTomographyImageStorage
        "1.2.840.10008.5.1.4.1.1.130",  # EnhancedPETImageStorage
        "1.2.840.10008.5.1.4.1.1.128.1",  # LegacyConvertedEnhancedPETImageStorage
    ),
    "NM": (
        "1.2.840.10008.5.1.4.1.1.20",  # NuclearMedicineImageStorage
    ),
    "US": (
        "1.2.840.10008.5.1.4.1.1.6.1",  # UltrasoundImageStorage
        "1.2.840.10008.5.1.4.1.1.3.1",  # UltrasoundMultiFrameImageStorage
        "1.2.840.10008.5.1.4.1.1.6.2",  # EnhancedUSVolumeStorage
    ),
    "CR": (
        "1.2.840.10008.5.1.4.1.1.1",  # ComputedRadiographyImageStorage
    ),
    "DX": (
        "1.2.840.10008.5.1.4.1.1.1.1",  # DigitalXRayImageStorageForPresentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # DigitalXRayImageStorageForProcessing
    ),
    "MG": (
        "1.2.840.10008.5.1.4.1.1.1.2",  # DigitalMammographyXRayImageStorageForPresentation
        "1.2.840.10008.5.1.4.1.1.1.2.1",  # DigitalMammographyXRayImageStorageForProcessing
        "1.2.840.10008.5.1.4.1.1.13.1.3",  # BreastTomosynthesisImageStorage
        "1.2.840.10008.5.1.4.1.1.13.1.4",  # BreastProjectionXRayImageStorageForPresentation
        "1.2.840.10008.5.1.4.1.1.13.1.5",  # BreastProjectionXRayImageStorageForProcessing
    ),
    "IO": (
        "1.2.840.10008.5.1.4.1.1.1.3",  # DigitalIntraOralXRayImageStorageForPresentation
        "1.2.840.10008.5.1.4.1.1.1.3.1",  # DigitalIntraOralXRayImageStorageForProcessing
    ),
    "XA": (
        "1.2.840.10008.5.1.4.1.1.12.1",  # XRayAngiographicImageStorage
        "1.2.840.10008.5.1.4.1.1.12.1.1",  # EnhancedXAImageStorage
        "1.2.840.10008.5.1.4.1.1.13.1.1",  # XRay3DAngiographicImageStorage
    ),
    "RF": (
        "1.2.840.10008.5.1.4.1.1.12.2",  # XRayRadiofluoroscopicImageStorage
        "1.2.840.10008.5.1.4.1.1.12.2.1",  # EnhancedXRFImageStorage
    ),
}
# modalities whose series are volumes: a rule for them alone skips series of fewer than this many images
VOLUME_MODALITIES = ("CT", "MR", "PT")
VOLUME_MIN_IMAGES = 10


class MatchRule(BaseModel):
    """Which series a model is given. A key left out takes its default; an empty list allows any value.
    Images are counted frame by frame: a multi-frame instance of 120 frames is 120 images."""

    model_config = {"extra": "forbid"}

    modalities: list[str] = Field(default_factory=lambda: ["CT"], description="Modality values; empty: any")
    sop_class_uids: list[str] | None = Field(
        None, description="SOP Class UIDs; left out: the image storage classes of the modalities given (CT: CT, "
        "Enhanced CT and Legacy Converted Enhanced CT Image Storage; MR: MR, Enhanced MR, Enhanced MR Color and "
        "Legacy Converted Enhanced MR Image Storage; ...; no modalities: every image storage class), never SEG, SR "
        "or secondary capture; empty: any",
    )
    body_parts: list[str] = Field(default_factory=list, description="Body Part Examined, upper case; empty: any")
    mr_acquisition_types: list[str] = Field(default_factory=list, description="2D, 3D; empty: any")
    image_type: list[str] = Field(default_factory=list, description="values Image Type must all contain")
    series_description: str = Field("", description="regular expression the description must match")
    series_description_exclude: str = Field("", description="regular expression the description must not match")
    orientations: list[Literal["axial", "coronal", "sagittal", "oblique"]] = Field(
        default_factory=list, description="slice orientations, from the direction cosines; empty: any"
    )
    min_instances: int | None = Field(
        None, ge=1, description="a series with fewer images (each frame of a multi-frame instance counts) is "
        f"skipped; left out: {VOLUME_MIN_IMAGES} when every modality given is a volume modality "
        f"({', '.join(VOLUME_MODALITIES)}), else 1"
    )
    max_instances: int = Field(0, ge=0, description="a series with more images is skipped; 0: no maximum")
    calling_aets: list[str] = Field(default_factory=list, description="empty: any sender")

    @field_validator("series_description", "series_description_exclude")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
        return value

    @field_validator("body_parts", "mr_acquisition_types", "image_type", "modalities")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [v.upper() for v in value]

    @model_validator(mode="after")
    def _defaults_follow_modalities(self) -> MatchRule:
        """Fill in what was left out from what was written, so that the rule shown is the rule applied."""
        if self.sop_class_uids is None:
            unknown = [m for m in self.modalities if m not in IMAGE_STORAGE_CLASSES]
            if unknown:
                raise ValueError(
                    f"no default SOP classes for modality {', '.join(unknown)}: list sop_class_uids (or [] for any); "
                    f"defaults exist for {', '.join(IMAGE_STORAGE_CLASSES)}")
            self.sop_class_uids = [c for m in (self.modalities or IMAGE_STORAGE_CLASSES) for c in IMAGE_STORAGE_CLASSES[m]]
        if self.min_instances is None:
            volumes = bool(self.modalities) and all(m in VOLUME_MODALITIES for m in self.modalities)
            self.min_instances = VOLUME_MIN_IMAGES if volumes else 1
        return self


CodeTriple = Annotated[list[str], Field(min_length=3, max_length=3, description="[scheme, value, meaning]")]


class SegmentConfig(BaseModel):
    """One label of a label map (or one channel of probability maps) and its DICOM description."""

    model_config = {"extra": "forbid", "populate_by_name": True}

    label: int = Field(ge=1, le=255, description="its value in the label map (probability maps: channel, from 1)")
    name: str = Field(min_length=1, max_length=64, description="the segment's label, as viewers show it")
    category: CodeTriple = Field(default_factory=lambda: ["SCT", "85756007", "Tissue"])
    property_type: CodeTriple = Field(default_factory=lambda: ["SCT", "123037004", "Anatomical Structure"], alias="type")
    description: str = Field("", description="free text: the segment's description")
    color: list[int] | None = Field(None, min_length=3, max_length=3, description="[r, g, b] 0..255 for viewers")


class OutputConfig(BaseModel):
    """What one named output of a model is: its kind, and its segments or coded name."""

    model_config = {"extra": "forbid"}

    kind: Literal["labelmap", "probabilities", "score", "classification", "boxes"] = Field(
        description="what the model returns under this key")
    segments: list[SegmentConfig] = Field(default_factory=list)
    name: CodeTriple | None = Field(None, description="score, classification: its coded name [scheme, value, meaning]")
    values: dict[str, CodeTriple] = Field(
        default_factory=dict, description="class value (classification) or box label (boxes) -> coded meaning"
    )

    @model_validator(mode="after")
    def _complete(self) -> OutputConfig:
        if self.kind in ("labelmap", "probabilities") and not self.segments:
            raise ValueError(f"a {self.kind} output needs segments")
        if self.kind in ("score", "classification") and self.name is None:
            raise ValueError(f"a {self.kind} output needs a coded name [scheme, value, meaning]")
        return self


class TransformConfig(BaseModel):
    """One MONAI transform by class name, with its arguments (dictionary transforms get ``keys``)."""

    model_config = {"extra": "forbid"}

    name: str = Field(description="a MONAI transform class, such as LoadImaged or ScaleIntensityRanged")
    args: dict[str, Any] = Field(default_factory=dict, description="its keyword arguments")


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
    min_dice: float = Field(0.98, gt=0, le=1, description="lowest Dice coefficient with expected_mask that passes")
    expected_volume_ml: dict[str, float] = Field(default_factory=dict, description="segment name -> mL")
    volume_tolerance: float = Field(0.02, ge=0, description="relative, 0.02 = 2 %")
    expected_values: dict[str, float] = Field(default_factory=dict, description="score output key -> value")
    value_tolerance: float = Field(0.01, ge=0, description="absolute")
    implausible: bool = Field(False, description="the case must fail the model's plausibility checks (a phantom)")

    @model_validator(mode="after")
    def _something_to_check(self) -> ReferenceCase:
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
    threshold: float = Field(0.5, gt=0, lt=1, description="probabilities_as: binary: the probability a voxel needs")


class Range(BaseModel):
    """An inclusive range; either end may be open."""

    model_config = {"extra": "forbid"}

    min: float | None = Field(None, description="lower end, included; null: open")
    max: float | None = Field(None, description="upper end, included; null: open")

    def holds(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class CheckCondition(BaseModel):
    """Study-level facts a check applies to; a check with conditions applies only when the facts
    are known and match (an unknown age matches no age range)."""

    model_config = {"extra": "forbid"}

    age_months: Range | None = None
    sex: list[Literal["M", "F", "O"]] | None = Field(None, description="Patient's Sex values it applies to; null: any")


class ResultCheck(BaseModel):
    """A bound on one measured fact of a model's result: a segment's ``volume_ml``, its number of
    connected ``components`` (26-connected), the ``fov_fraction`` of the volume it fills, or a
    score output's ``value``."""

    model_config = {"extra": "forbid"}

    segment: str | None = Field(None, description="segment name (volume_ml, components, fov_fraction)")
    output: str | None = Field(None, description="score output key (value)")
    measure: Literal["volume_ml", "components", "fov_fraction", "value"] = Field(description="the fact bounded")
    min: float | None = Field(None, description="the lowest plausible value")
    max: float | None = Field(None, description="the highest plausible value")
    when: CheckCondition | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ResultCheck:
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

    kind: Literal["head_like"] = Field(description="the check")
    min_variation: float = Field(0.2, ge=0, description="lowest coefficient of variation of the foreground")
    extent_mm: Range = Field(default_factory=lambda: Range(min=100, max=320))


class PlausibilityChecks(BaseModel):
    """What must hold for a result to be delivered as it is, and what happens when it does not:
    ``withhold`` (nothing goes to the PACS; the job ends as implausible with the reasons) or
    ``flag`` (delivered, marked as failing the checks in the SR and the series descriptions)."""

    model_config = {"extra": "forbid"}

    on_fail: Literal["withhold", "flag"] = Field(
        "withhold", description="withhold: nothing is delivered; flag: delivered, marked as failing")
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


ModelKind = Literal["builtin", "python", "torchscript", "monai-bundle", "triton", "arterys", "monai-deploy", "nnunet"]

# the fields, their order and their defaults that named a model before each kind had its own class:
# fingerprint() reproduces them, so that the jobs of an unchanged configuration keep their names
_FINGERPRINT_FIELDS: dict[str, Any] = {"kind": None, "source": "ct-body", "pipeline": None, "version": "", "options": {},
                       "outputs": {}, "seg": None}
_SERVED_FIELDS: dict[str, Any] = {"url": None, "model_name": None, "model_version": "",
                                  "inference_command": "get-probability-mask", "command": None, "model_path": None,
                                  "irregular_spacing": "refuse", "scope": "series",
                                  # kind nnunet's inference settings (absent for the other kinds)
                                  "folds": None, "checkpoint": "checkpoint_final.pth", "use_mirroring": True,
                                  "tile_step_size": 0.5, "image_reader_writer": None}


class ModelSettings(BaseModel):
    """What every kind of model has: a name, the series it is given, and what becomes of its results.

    Each ``kind`` is a subclass with the keys of that kind; ``ModelSettings(...)`` builds the class
    of the ``kind`` given (``builtin`` when none is), so a key of another kind is refused.
    """

    model_config = {"extra": "forbid"}

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="the model's name; its queue is model.<name>"
    )
    kind: ModelKind = Field("builtin", description="how the model is loaded, or reached when it runs elsewhere")
    version: str = Field("", description="written into results; default: the class's `version` or 0")
    match: MatchRule = Field(default_factory=MatchRule)
    irregular_spacing: Literal["refuse", "process"] = Field(
        "refuse", description="a series with uneven slice gaps (a missing slice): refuse it with the reason, or give "
        "it to the model at its true slice positions (spacing: the median gap; the job's notes list the gaps)"
    )
    scope: Literal["series", "study"] = Field(
        "series", description="series: one job per matching series; study: one job per study with every matching "
        "series, once the study is quiet (kind python: predict(study))"
    )
    tests: list[ReferenceCase] = Field(default_factory=list, description="reference cases with known answers")
    seg: SegOptions = Field(default_factory=SegOptions)
    checks: PlausibilityChecks | None = Field(
        None, description="plausibility checks; default: the built-in model's own, else none"
    )
    destinations: list[str] = Field(
        default_factory=list, description="names of the destinations its results go to; empty: every destination"
    )

    def __new__(cls, *args: Any, **data: Any) -> ModelSettings:
        if cls is ModelSettings:  # the class of the kind asked for; an unknown kind is refused by the base
            cls = MODEL_KINDS.get(data.get("kind", "builtin"), cls)
        return super().__new__(cls)

    @model_validator(mode="after")
    def _study_scope(self) -> ModelSettings:
        if self.scope == "study" and self.kind != "python":
            raise ValueError(f"scope: study needs kind: python (a class with predict(study)), not kind: {self.kind}")
        return self

    def effective_checks(self) -> PlausibilityChecks:
        """The configured checks, else the built-in model's defaults, else none."""
        if self.checks is not None:
            return self.checks
        if self.kind == "builtin":
            return BUILTIN_CHECKS.get(getattr(self, "source", ""), PlausibilityChecks())
        return PlausibilityChecks()

    def fingerprint(self) -> str:
        """Names what the model computes (kind, source, version, options, outputs, pipeline): a new
        version or other options make a new job for the same series, and so a re-run."""
        import hashlib

        from pydantic_core import to_json

        computed = {key: getattr(self, key, default) for key, default in _FINGERPRINT_FIELDS.items()}
        computed["source"] = computed["source"] or _FINGERPRINT_FIELDS["source"]  # monai-deploy with a command
        text = to_json(computed, by_alias=False).decode()
        served = {key: getattr(self, key) for key, default in _SERVED_FIELDS.items()
                  if getattr(self, key, default) != default}
        if served:  # model servers' and kind nnunet's settings; absent for the other kinds, whose names stay as they were
            text += to_json(served, by_alias=False).decode()
        return hashlib.sha256(text.encode()).hexdigest()[:8]


class BuiltinModelSettings(ModelSettings):
    """A model that comes with pacsworker (`ct-body`, `mr-brain`); `kind` may be left out for it."""

    kind: Literal["builtin"] = Field("builtin", description="`builtin` selects this kind (the default)")
    source: str = Field("ct-body", description="the built-in model's name: ct-body or mr-brain")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the model class")
    outputs: dict[str, OutputConfig] = Field(default_factory=dict, description="output key -> what it is")


class PythonModelSettings(ModelSettings):
    """A Python class: native `predict(series)` (or `predict(study)`), or the named inputs of `inference(...)`."""

    kind: Literal["python"] = Field(description="`python` selects this kind")
    source: str = Field(description="'package.module:Class' or '/path/file.py:Class'")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the model class")
    outputs: dict[str, OutputConfig] = Field(default_factory=dict, description="output key -> what it is")


class TorchscriptModelSettings(ModelSettings):
    """A TorchScript file run inside a MONAI pipeline of pre-transforms, an inferer and post-transforms."""

    kind: Literal["torchscript"] = Field(description="`torchscript` selects this kind")
    source: str = Field(description="the TorchScript file (.ts, .pt)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    pipeline: PipelineConfig | str | None = Field(None, description="inline, or a YAML file beside the model")
    outputs: dict[str, OutputConfig] = Field(default_factory=dict, description="output key -> what it is")


class MonaiBundleModelSettings(ModelSettings):
    """A MONAI bundle, read with MONAI's own parser."""

    kind: Literal["monai-bundle"] = Field(description="`monai-bundle` selects this kind")
    source: str = Field(description="the bundle directory")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    outputs: dict[str, OutputConfig] = Field(
        default_factory=dict, description="output key -> what it is; default: the bundle's channel definition")


class TritonModelSettings(ModelSettings):
    """A network served by Triton Inference Server; the pipeline around it runs in the worker."""

    kind: Literal["triton"] = Field(description="`triton` selects this kind")
    url: str = Field(pattern=r"^(https?|grpc)://", description="http://host:port, https://host:port or grpc://host:port")
    model_name: str = Field(min_length=1, description="the model's name on the server")
    model_version: str = Field("", description="a version on the server; empty: the server's choice")
    device: str = Field(
        "auto", description="where the worker runs the pipeline around the network: auto, cpu, cuda, cuda:N")
    pipeline: PipelineConfig | str | None = Field(
        None, description="as kind torchscript's: inline, or a YAML file by its absolute path")
    outputs: dict[str, OutputConfig] = Field(default_factory=dict, description="output key -> what it is")
    request_timeout_seconds: float = Field(300.0, gt=0, description="one request's time limit")
    wait_seconds: float = Field(
        300.0, ge=0, description="how long a job waits for an unreachable server or a model that is not ready "
        "before it fails")

    @field_validator("pipeline")
    @classmethod
    def _absolute(cls, value: PipelineConfig | str | None) -> PipelineConfig | str | None:
        if isinstance(value, str) and not Path(value).is_absolute():
            raise ValueError("a pipeline file of kind triton is named by its absolute path: there is no model file "
                             "for it to be beside")
        return value


class ArterysModelSettings(ModelSettings):
    """A model server speaking the Arterys inference protocol (`GET /healthcheck`, `POST /`)."""

    kind: Literal["arterys"] = Field(description="`arterys` selects this kind")
    url: str = Field(pattern=r"^https?://", description="the model server's base URL")
    inference_command: Literal["get-probability-mask", "get-bounding-box-2d"] = Field(
        "get-probability-mask", description="what the model server is asked for"
    )
    outputs: dict[str, OutputConfig] = Field(
        default_factory=dict, description="output key -> what it is (optional coding of segments and boxes)")
    request_timeout_seconds: float = Field(300.0, gt=0, description="one request's time limit")
    wait_seconds: float = Field(
        300.0, ge=0, description="how long a job waits for an unreachable server or one not READY before it fails")


class MonaiDeployModelSettings(ModelSettings):
    """A MONAI Deploy App SDK application (`source`) or a packaged MAP run by a command template (`command`)."""

    kind: Literal["monai-deploy"] = Field(description="`monai-deploy` selects this kind")
    source: str | None = Field(
        None, description="the application: a folder with __main__.py, or a .py file or package with an Application "
        "subclass")
    command: str | None = Field(
        None, description="a packaged application (MAP): a command template with {input}, {output} and {model}; "
        "instead of source"
    )
    model_path: Path | None = Field(None, description="the model file or folder the application reads")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N (sets CUDA_VISIBLE_DEVICES)")
    options: dict[str, Any] = Field(
        default_factory=dict, description="timeout_seconds, env (extra environment), python (the interpreter)")

    @model_validator(mode="after")
    def _one_application(self) -> MonaiDeployModelSettings:
        if (self.source is None) == (self.command is None):
            raise ValueError("kind monai-deploy needs either source (an application) or command (a MAP), not "
                             + ("both" if self.source else "neither"))
        return self


NnunetReader = Literal["SimpleITKIO", "NibabelIO", "SimpleITKIOWithReorient", "NibabelIOWithReorient"]


class NnunetModelSettings(ModelSettings):
    """An nnU-Net v2 trained-model folder, run by nnU-Net's own predictor on the worker's device."""

    kind: Literal["nnunet"] = Field(description="`nnunet` selects this kind (extra: pip install 'pacsworker[nnunet]')")
    source: str = Field(
        description="the trained-model folder: dataset.json, plans.json and fold_N/ with the checkpoint, as "
        "nnUNetv2_train leaves it under nnUNet_results (Dataset.../Trainer__Plans__configuration)")
    folds: list[int | Literal["all"]] | None = Field(
        None, min_length=1, description="the folds to run, their predictions averaged (an ensemble); "
        "default: every fold_N folder that holds the checkpoint")
    checkpoint: str = Field(
        "checkpoint_final.pth", pattern=r"^[^/\\]+$", description="the checkpoint file name in each fold's folder")
    use_mirroring: bool = Field(True, description="test-time mirroring, as nnU-Net's default (--disable_tta turns it off)")
    tile_step_size: float = Field(
        0.5, gt=0, le=1, description="sliding-window step as a fraction of the patch size, as nnU-Net's -step_size")
    image_reader_writer: NnunetReader | None = Field(
        None, description="the nnU-Net reader whose view of a NIfTI of the series the model gets; default: plans.json's. "
        "*WithReorient: turned to the nearest RAS first, as for models trained on RAS images (TotalSegmentator)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    outputs: dict[str, OutputConfig] = Field(
        default_factory=dict, description="at most one, a labelmap or probabilities (a FRACTIONAL SEG); its "
        "segments code dataset.json's labels by value; default: a label map named from dataset.json's labels")

    @model_validator(mode="after")
    def _one_map(self) -> NnunetModelSettings:
        if len(self.outputs) > 1:
            raise ValueError(f"kind nnunet has one output (a labelmap or probabilities), not {len(self.outputs)}: "
                             f"{', '.join(self.outputs)}")
        for key, output in self.outputs.items():
            if output.kind not in ("labelmap", "probabilities"):
                raise ValueError(f"output {key!r}: kind nnunet gives a labelmap or probabilities, not {output.kind}")
        return self


MODEL_KINDS: dict[str, type[ModelSettings]] = {
    typing.get_args(cls.model_fields["kind"].annotation)[0]: cls
    for cls in (BuiltinModelSettings, PythonModelSettings, TorchscriptModelSettings, MonaiBundleModelSettings,
                TritonModelSettings, ArterysModelSettings, MonaiDeployModelSettings, NnunetModelSettings)
}
AnyModel = Annotated[
    BuiltinModelSettings | PythonModelSettings | TorchscriptModelSettings | MonaiBundleModelSettings
    | TritonModelSettings | ArterysModelSettings | MonaiDeployModelSettings | NnunetModelSettings,
    Field(discriminator="kind"),
]


def _builtin_by_default(value: Any) -> Any:
    """A model written without ``kind`` is a built-in one."""
    if isinstance(value, list):
        return [{"kind": "builtin", **item} if isinstance(item, dict) and "kind" not in item else item
                for item in value]
    return value


MR_IMAGE_CLASSES = list(IMAGE_STORAGE_CLASSES["MR"][:2])  # grey-scale MR images


def brain_extra_installed() -> bool:
    """Whether the optional ``brain`` extra (deepbet) is importable, without importing it."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("deepbet", "cc3d", "fill_voids"))


def default_models() -> list[AnyModel]:
    """ct-body, and mr-brain when its extra is installed: what runs with no ``models`` configured."""
    models: list[AnyModel] = [BuiltinModelSettings(name="ct-body")]
    if brain_extra_installed():
        models.append(BuiltinModelSettings(
            name="mr-brain", kind="builtin", source="mr-brain",
            match=MatchRule(
                modalities=["MR"], sop_class_uids=MR_IMAGE_CLASSES, body_parts=["BRAIN", "HEAD"],
                mr_acquisition_types=["3D"], image_type=["ORIGINAL"], min_instances=1,
                # 3D T1-weighted only: other 3D contrasts of the head are left alone
                series_description_exclude=r"(?i)flair|t2|dwi|diff|adc|swi|tof|angio|perf|space|cube",
            ),
        ))
    return models


class _NamedSecret(BaseModel):
    """An auth method whose secret the YAML names (an environment variable or a file), never holds."""

    model_config = {"extra": "forbid"}
    secret_key: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _not_inline(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.secret_key in data:
            key = cls.secret_key
            raise ValueError(
                f"{key} may not be written in the configuration: name an environment variable ({key}_env) "
                f"or a file ({key}_file) that holds it"
            )
        return data

    @model_validator(mode="after")
    def _one_source(self) -> _NamedSecret:
        key = self.secret_key
        given = [name for name in (f"{key}_env", f"{key}_file") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {key}_env or {key}_file (got {', '.join(given) or 'neither'})")
        return self


class NoAuth(BaseModel):
    """No authentication (the same as leaving ``auth`` out)."""

    model_config = {"extra": "forbid"}

    kind: Literal["none"]


class BasicAuth(_NamedSecret):
    """HTTP basic authentication; the password is read from an environment variable or a file when sending."""

    secret_key = "password"

    kind: Literal["basic"] = "basic"
    username: str = Field(min_length=1, description="the user name")
    password_env: str | None = Field(None, description="environment variable that holds the password")
    password_file: Path | None = Field(None, description="file that holds the password (a trailing newline is ignored)")


class BearerAuth(_NamedSecret):
    """A static bearer token (``Authorization: Bearer ...``) read from an environment variable or a file."""

    secret_key = "token"

    kind: Literal["bearer"]
    token_env: str | None = Field(None, description="environment variable that holds the token")
    token_file: Path | None = Field(
        None, description="file that holds the token, read again for every request (a rotated token is picked up)"
    )


class OAuth2Auth(_NamedSecret):
    """OAuth2 client credentials grant (RFC 6749 4.4): a bearer token fetched from ``token_url``, cached and
    renewed before it expires; a 401 with a cached token fetches a new one once and resends."""

    secret_key = "client_secret"

    kind: Literal["oauth2"]
    token_url: str = Field(pattern=r"^https?://", description="the authorization server's token endpoint")
    client_id: str = Field(min_length=1, description="the client's id")
    client_secret_env: str | None = Field(None, description="environment variable that holds the client secret")
    client_secret_file: Path | None = Field(None, description="file that holds the client secret")
    scope: str = Field("", description="space-separated scopes to ask for; empty: the server's default")
    audience: str = Field("", description="the audience parameter some servers need (Auth0, Keycloak); empty: none")
    client_auth: Literal["basic", "post"] = Field(
        "basic", description="basic: client id and secret as HTTP basic (client_secret_basic); post: in the form body"
    )
    renew_before_seconds: float = Field(
        30.0, ge=0, description="renew a token this long before it expires, or at 10 % of its lifetime if sooner"
    )
    timeout_seconds: float = Field(30.0, gt=0, description="time limit of one token request")


HttpAuth = Annotated[NoAuth | BasicAuth | BearerAuth | OAuth2Auth, Field(discriminator="kind")]


class ClientTlsSettings(BaseModel):
    """How pacsworker checks a destination's TLS certificate, and the certificate it shows (mutual TLS)."""

    model_config = {"extra": "forbid"}

    ca_bundle: Path | None = Field(
        None, description="CA certificates (PEM) the server's certificate must chain to; default: the system's "
        "(dicomweb: requests' bundle, or $REQUESTS_CA_BUNDLE)"
    )
    verify: bool = Field(True, description="false: accept any server certificate (for tests only, never in production)")
    client_certificate: Path | None = Field(None, description="certificate (PEM) to present for mutual TLS")
    client_key: Path | None = Field(
        None, description="its private key (PEM, unencrypted); omit when client_certificate holds it too"
    )

    @model_validator(mode="after")
    def _pair(self) -> ClientTlsSettings:
        if self.client_key is not None and self.client_certificate is None:
            raise ValueError("client_key needs client_certificate")
        return self


class OpenDoor(BaseModel):
    """No authentication: anyone who reaches the port is served."""

    model_config = {"extra": "forbid"}

    kind: Literal["none"]


class BasicUsers(BaseModel):
    """HTTP basic authentication against a file of users and scrypt password hashes (``pacsworker users add``
    writes it); the file is read again when it changes."""

    model_config = {"extra": "forbid"}

    kind: Literal["basic"]
    users_file: Path = Field(description="one user:hash line per user, as `pacsworker users add FILE USER` writes")
    realm: str = Field("pacsworker", pattern=r'^[^"\\]*$', description="the realm named in the 401 challenge")


class BearerTokens(BaseModel):
    """Static bearer tokens (``Authorization: Bearer ...``) listed in a file, one per line; the file is read
    again when it changes."""

    model_config = {"extra": "forbid"}

    kind: Literal["bearer"]
    tokens_file: Path = Field(description="one token (at least 16 characters) per line; # starts a comment line")
    realm: str = Field("pacsworker", pattern=r'^[^"\\]*$', description="the realm named in the 401 challenge")


JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


class JwtIssuer(BaseModel):
    """OAuth2 access tokens that are JWTs (RFC 9068), checked against the issuer's published keys (JWKS):
    signature, issuer, audience, expiry and not-before, and a scope. Nothing is fetched at start-up: the keys
    are fetched on the first request, cached, and fetched again for a key id they do not hold."""

    model_config = {"extra": "forbid"}

    kind: Literal["oauth2"]
    issuer: str = Field(pattern=r"^https?://", description="the iss claim tokens must carry, e.g. "
                        "https://login.example.org/realms/pacs")
    audience: str = Field(min_length=1, description="the aud claim tokens must carry (this receiver's API name)")
    jwks_url: str | None = Field(
        None, pattern=r"^https?://", description="the issuer's JWKS; left out: the jwks_uri of "
        "{issuer}/.well-known/openid-configuration, read on the first request"
    )
    required_scope: str = Field("", description="a scope the token's scope (or scp) claim must hold; empty: none")
    algorithms: list[Literal[JWT_ALGORITHMS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["RS256", "ES256"], min_length=1,
        description="signature algorithms accepted (asymmetric only: none and HS* are never accepted)",
    )
    leeway_seconds: float = Field(30.0, ge=0, le=300, description="clock skew allowed on exp, nbf and iat")
    jwks_cache_seconds: float = Field(3600.0, gt=0, description="how long fetched keys are used before fetching again")
    jwks_refetch_seconds: float = Field(
        60.0, ge=0, description="a token with a key id the keys do not hold fetches them again at most this often"
    )
    timeout_seconds: float = Field(10.0, gt=0, description="time limit of one request for the keys")
    tls: ClientTlsSettings = Field(
        default_factory=lambda: ClientTlsSettings(), description="https issuer: CA bundle to check it with"
    )
    realm: str = Field("pacsworker", pattern=r'^[^"\\]*$', description="the realm named in the 401 challenge")


StowAuth = Annotated[OpenDoor | BasicUsers | BearerTokens | JwtIssuer, Field(discriminator="kind")]
OperatorAuth = Annotated[OpenDoor | BasicUsers | BearerTokens, Field(discriminator="kind")]
DoorAuth = OpenDoor | BasicUsers | BearerTokens | JwtIssuer


class DicomwebDestination(BaseModel):
    """DICOMweb STOW-RS (``POST {url}/studies``) with per-instance outcomes from the response."""

    model_config = {"extra": "forbid"}

    kind: Literal["dicomweb"]
    name: str = Field("dicomweb", description="names the destination in records, logs, status and model routes")
    url: str = Field(pattern=r"^https?://", description="the DICOMweb root, e.g. https://pacs.example.org/dicom-web")
    auth: HttpAuth | None = Field(None, description="none (default), basic, bearer or oauth2")
    tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings, description="https: CA bundle and client certificate")
    timeout_seconds: float = Field(60.0, gt=0, description="time limit of one request")
    instances_per_request: int = Field(
        0, ge=0, description="at most this many instances in one STOW-RS request; 0: all of a result in one"
    )

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        if urllib.parse.urlsplit(value).username is not None:
            raise ValueError("credentials may not be part of the URL: give them in auth (from env or a file)")
        return value

    @field_validator("auth", mode="before")
    @classmethod
    def _basic_by_default(cls, value: Any) -> Any:
        if isinstance(value, dict) and "kind" not in value and "username" in value:
            return {"kind": "basic", **value}  # written before kinds existed: {username, password_env}
        return value


class DimseDestination(BaseModel):
    """DICOM C-STORE (SCU) to a PACS; only the SOP classes and transfer syntaxes of the files sent are proposed."""

    model_config = {"extra": "forbid"}

    kind: Literal["dimse"]
    name: str = Field("dimse", description="names the destination in records, logs, status and model routes")
    host: str = Field(min_length=1, description="the PACS's host name or address")
    port: int = Field(104, ge=1, le=65535, description="its DICOM port")
    ae_title: str = Field(description="the PACS's AE title (called AE)")
    calling_ae_title: str = Field("PACSWORKER", description="pacsworker's AE title in the association (calling AE)")
    timeout_seconds: float = Field(60.0, gt=0, description="time limit of association, each C-STORE and network reads")
    tls: ClientTlsSettings | None = Field(None, description="DICOM TLS (PS3.15 B.1); none: plain TCP")

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae(value)


class FolderDestination(BaseModel):
    """A folder: ``<path>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``, each file written atomically."""

    model_config = {"extra": "forbid"}

    kind: Literal["folder"]
    name: str = Field("folder", description="names the destination in records, logs, status and model routes")
    path: Path = Field(description="the folder (created when missing)")


Destination = Annotated[DicomwebDestination | DimseDestination | FolderDestination, Field(discriminator="kind")]
AnyDestination = DicomwebDestination | DimseDestination | FolderDestination


class DeliverySettings(BaseModel):
    """How results are retried: exponential backoff with jitter, per destination, until a maximum age;
    then (or at once on a permanent failure) the result is dead-lettered: kept in the outbox, shown by
    ``pacsworker status`` and sent again by ``pacsworker deliveries retry``."""

    model_config = {"extra": "forbid"}

    max_age_seconds: float = Field(
        86400.0, gt=0, description="how long a result is retried (from its first attempt) before it is dead-lettered"
    )
    backoff_base_seconds: float = Field(5.0, gt=0, description="the wait after the first failed attempt; doubles after each")
    backoff_max_seconds: float = Field(600.0, gt=0, description="the longest wait between two attempts")

    @model_validator(mode="after")
    def _order(self) -> DeliverySettings:
        if self.backoff_max_seconds < self.backoff_base_seconds:
            raise ValueError("delivery.backoff_max_seconds must not be lower than delivery.backoff_base_seconds")
        return self


class MetricsSettings(BaseModel):
    """The operator's HTTP port of each process: Prometheus /metrics, /healthz, /readyz and a status page."""

    model_config = {"extra": "forbid"}

    enabled: bool = Field(True, description="serve metrics, health and the status page")
    host: str = Field(
        "127.0.0.1", description="address the metrics port listens on; 0.0.0.0: every interface (then consider tls)"
    )
    port: int = Field(9100, ge=1, le=65535, description="the receiver's (and serve's, for all its processes)")
    worker_port: int = Field(
        9101, ge=0, le=65535, description="a stand-alone worker's (pacsworker worker --metrics-port overrides it); "
        "0: none"
    )
    records_cache_seconds: float = Field(
        5.0, ge=0, description="how long counts read from data_dir's records are reused between scrapes"
    )
    ready_cache_seconds: float = Field(
        10.0, ge=0, description="how long /readyz reuses a destination's check (a C-ECHO, an authenticated "
        "DICOMweb request), so that probes do not open connections to every destination each time"
    )
    ready_timeout_seconds: float = Field(
        5.0, gt=0, description="time limit of one destination's check for /readyz (or its timeout_seconds if lower)"
    )
    auth: OperatorAuth = Field(
        default_factory=lambda: OpenDoor(kind="none"),
        description="who may read the status page and /metrics: none, basic or bearer; /healthz and /readyz stay "
        "open for probes",
    )
    tls: TlsCertificates | None = Field(None, description="HTTPS on the metrics port; none: plain HTTP")
    limits: HttpLimits = Field(default_factory=HttpLimits, description="connections, requests and timeouts")


class LoggingSettings(BaseModel):
    model_config = {"extra": "forbid"}

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level of every process")
    format: Literal["plain", "json"] = Field(
        "plain", description="plain text, or one JSON object per line (time, level, logger, process, correlation, "
        "message); the correlation is the series UID or job id a line is about"
    )


class _EnvWithUnknownSections(PydanticBaseSettingsSource):
    """The environment source, plus the ``PACSWORKER__`` variables it would drop because they name no
    section (``PACSWORKER__SCPP__PORT``), so that they are refused like an unknown key in the file."""

    def __init__(self, settings_cls: type[BaseSettings], env: PydanticBaseSettingsSource):
        super().__init__(settings_cls)
        self.env = env

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ gives everything

    def __call__(self) -> dict[str, Any]:
        data = self.env()
        prefix, delimiter = self.config["env_prefix"].lower(), self.config["env_nested_delimiter"]
        for name, value in os.environ.items():
            parts = name.lower()[len(prefix):].split(delimiter) if name.lower().startswith(prefix) else [""]
            if parts[0] and parts[0] not in self.settings_cls.model_fields:
                node = data
                for part in parts[:-1]:
                    node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
                node[parts[-1]] = value
        return data


class Settings(BaseSettings):
    """Everything pacsworker reads at start-up; validated once, then passed around."""

    model_config = SettingsConfigDict(
        env_prefix="PACSWORKER__", env_nested_delimiter="__", extra="forbid"
    )

    scp: ScpSettings = Field(default_factory=ScpSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    models: list[AnyModel] = Field(default_factory=default_models)
    destinations: list[Destination] = Field(
        default_factory=list, description="where results go; empty: a folder data_dir/results"
    )
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    @field_validator("models", mode="before")
    @classmethod
    def _kind_builtin_by_default(cls, value: Any) -> Any:
        return _builtin_by_default(value)

    @field_validator("models")
    @classmethod
    def _unique_models(cls, value: list[ModelSettings]) -> list[ModelSettings]:
        names = [m.name for m in value]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        return value

    @model_validator(mode="after")
    def _routes(self) -> Settings:
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError(f"destination names must be unique (give each a name:), got {names}")
        for model in self.models:
            unknown = [name for name in model.destinations if name not in names]
            if unknown:
                raise ValueError(f"model {model.name} routes to {unknown}, which no destination is named; "
                                 f"destinations: {names or 'none configured (the default folder)'}")
        # the older queue.delivery_backoff_* keys, where the delivery section does not say otherwise
        for old, new in (("delivery_backoff_seconds", "backoff_base_seconds"),
                         ("delivery_backoff_max_seconds", "backoff_max_seconds")):
            if old in self.queue.model_fields_set and new not in self.delivery.model_fields_set:
                setattr(self.delivery, new, getattr(self.queue, old))
        return self

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
        return _EnvWithUnknownSections(settings_cls, env_settings), init_settings

    @property
    def data_dir(self) -> Path:
        return self.storage.data_dir.resolve()

    def effective_destinations(self, model: str | None = None) -> list[AnyDestination]:
        """The destinations results go to: a model's route (its ``destinations``, else all), else all."""
        configured = list(self.destinations) or [
            FolderDestination(kind="folder", name="results", path=self.data_dir / "results")]
        route = self.model(model).destinations if model is not None else []
        return [d for d in configured if d.name in route] if route else configured

    def destination(self, name: str) -> AnyDestination | None:
        """The destination of that name (the default folder is ``results``), None if not configured."""
        return next((d for d in self.effective_destinations() if d.name == name), None)

    def model(self, name: str) -> ModelSettings:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(f"no model named {name!r} in the configuration")


class ConfigError(Exception):
    """The configuration file or environment holds an invalid value."""


def _strip_type(annotation: Any) -> Any:
    """The annotation without ``Annotated`` and without an optional ``None``."""
    while True:
        if typing.get_origin(annotation) is Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(members) == 1:
            annotation = members[0]
            continue
        return annotation


def _keys_of(cls: type[BaseModel]) -> list[str]:
    """The keys a settings class takes: its field names and their aliases."""
    return [key for name, info in cls.model_fields.items() for key in (name, info.alias) if key]


def _section_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The settings class at a validation error's location (list indices, mapping keys and the kind
    of a discriminated union included), None where the path leads to no class."""
    node: Any = Settings
    for part in loc:
        node = _strip_type(node)
        origin, args = typing.get_origin(node), typing.get_args(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            node = next((info.annotation for name, info in node.model_fields.items() if part in (name, info.alias)),
                        None)
        elif origin in (list, tuple) and args and isinstance(part, int):
            node = args[0]
        elif origin is dict and args:
            node = args[1]
        elif origin in (typing.Union, types.UnionType):
            node = next((m for m in map(_strip_type, args) if isinstance(m, type) and issubclass(m, BaseModel) and (
                part == m.__name__ or part in typing.get_args(m.model_fields.get("kind", Field()).annotation))), None)
        else:
            return None
        if node is None:
            return None
    node = _strip_type(node)
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def _unknown_key(loc: tuple[int | str, ...]) -> str:
    """Why a key is unknown where it stands: the nearest valid name, or the kinds of model that take it."""
    section, key = _section_at(loc[:-1]), str(loc[-1])
    if section is None:
        return "unknown key"
    if issubclass(section, ModelSettings):
        kinds = [kind for kind, cls in MODEL_KINDS.items() if key in _keys_of(cls)]
        if kinds:
            named = ", ".join(kinds[:-1]) + " or " + kinds[-1] if len(kinds) > 1 else kinds[0]
            [own] = typing.get_args(section.model_fields["kind"].annotation)
            return f"`{key}` is a key of kind {named}, not of kind {own}"
    close = difflib.get_close_matches(key, _keys_of(section), n=1, cutoff=0.6)
    if not close:  # a key of a section below, written one level too high (series_quiet_seconds beside scp)
        below = [f"{name}.{child}" for name, info in section.model_fields.items()
                 if isinstance(inner := _strip_type(info.annotation), type) and issubclass(inner, BaseModel)
                 for child in _keys_of(inner)]
        close = difflib.get_close_matches(key, below, n=1, cutoff=0.6) or [
            k for k in below if difflib.get_close_matches(key, [k.split(".")[-1]], n=1, cutoff=0.6)][:1]
    if close:
        return f"unknown key; did you mean `{close[0]}`?"
    return f"unknown key (known here: {', '.join(_keys_of(section))})"


def _env_name(loc: tuple[int | str, ...]) -> str:
    """The environment variable that set the key at ``loc``, if one did."""
    name = "PACSWORKER__" + "__".join(str(part).upper() for part in loc)
    return next((env for env in os.environ if env.upper() == name or env.upper().startswith(name + "__")), "")


def _where(loc: tuple[int | str, ...], data: dict[str, Any]) -> str:
    """A dotted key, a model named by its name: ``models.0 (ct-body).match.modalites``."""
    parts = [str(p) for p in loc]
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        models = data.get("models")
        item = models[loc[1]] if isinstance(models, list) and loc[1] < len(models) else None
        name = item.get("name") if isinstance(item, dict) else None
        tagged = len(loc) >= 3 and loc[2] in MODEL_KINDS
        label = name or (loc[2] if tagged else None)
        parts = ["models", f"{loc[1]} ({label})" if label else str(loc[1]), *parts[3 if tagged else 2:]]
    return ".".join(parts) or "(top level)"


def _format_errors(err: ValidationError, origin: str, data: dict[str, Any] | None = None) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for item in err.errors():
        loc = tuple(item["loc"])
        key = _where(loc, data or {})
        got = item.get("input")
        if isinstance(got, dict) and {"password", "token", "client_secret"} & set(got):
            got = "(not shown: it holds a secret)"
        elif isinstance(got, str) and "://" in got and urllib.parse.urlsplit(got).password is not None:
            got = "(not shown: it holds a password)"
        if item["type"] == "extra_forbidden":
            env = _env_name(loc)
            lines.append(f"  {key}: {_unknown_key(loc)}" + (f" (from the environment: {env})" if env else ""))
            continue
        lines.append(f"  {key}: {item['msg']} (got {got!r})")
    return "\n".join(lines)


def _yaml_error(file: Path, exc: yaml.YAMLError) -> str:
    """A YAML syntax error as ``config.yaml line 7, column 3: what is wrong``."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{file} line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(file)
    what = "; ".join(str(p) for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p)
    return f"configuration file {where}: not valid YAML: {what or exc}"


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first on line {seen[key].line + 1}); "
                    "remove one: only the last would count", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


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
            loaded = yaml.load(file.read_text(), Loader=_StrictLoader)
        except FileNotFoundError:
            raise ConfigError(f"configuration file {file} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(_yaml_error(file, exc)) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"configuration file {file} must hold a mapping at top level")
        data = loaded or {}
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin, data)) from None
