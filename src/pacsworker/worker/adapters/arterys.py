"""``kind: arterys``: a model container behind the Arterys inference SDK's HTTP protocol.

The protocol, as the SDK documents it: ``GET /healthcheck`` answers ``READY`` when the model can
take requests; ``POST /`` takes a ``multipart/related`` request whose first part is JSON
(``{"inference_command": ...}``) and whose other parts are the series' DICOM files, and answers
``multipart/related``: a JSON part, then one binary part per entry of its ``parts`` (optionally a
last ``text/plain`` part with request and response digests).

What pacsworker sends and reads:

- The instances go in slice order along the normal (pacsworker's order, that of
  ``series.pixels``); the depth index of a 3D mask is the position in that order (for an enhanced
  multi-frame instance, its frames in that order).
- ``bounding_boxes_2d`` (``label``, ``SOPInstanceUID``, optional ``frame_number``, ``top_left`` and
  ``bottom_right`` as (column, row) pixel coordinates, optional ``score`` or ``probability``)
  become boxes: SR planar ROIs on the image they name. Coordinates are taken as pixel edges, as
  the SDK's whole-image box (0, 0)-(columns, rows) reads.
- ``parts`` with ``binary_type`` ``probability_mask`` (uint8 0..255 = 0..1) or ``boolean_mask``
  become probability maps, one per label (a FRACTIONAL SEG, or binary at ``seg.threshold`` with
  ``seg.probabilities_as: binary``); ``numeric_label_mask`` (with ``label_map``) a label map.
  A 3D part has ``binary_data_shape`` {timepoints: 1, depth, width, height}; a 2D part has
  {width, height} and ``dicom_image`` {SOPInstanceUID, frame_number}. Voxels are uint8 in
  column-row-slice order (the column index fastest).
- Segment and box labels get their codes from the model's ``outputs:`` when a segment or a boxes
  output's ``values`` names them; others are coded in the private scheme.

An answer that does not fit (a wrong number of binary parts, a buffer of the wrong length, an
instance that is not in the series, another series' mask) fails the job with a reason naming
what was wrong. A server that does not answer, or is not READY, is waited for up to
``wait_seconds``; then the job fails naming the URL and what the server last said.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import requests

from ...config import ArterysModelSettings
from ...multipart import decode_multipart, encode_multipart
from ..outputs import (
    ANATOMICAL_STRUCTURE,
    TISSUE,
    Box,
    Boxes,
    CodedTerm,
    LabelMap,
    ModelIdentity,
    ModelOutputError,
    ModelResult,
    ModelRunError,
    ProbabilityMaps,
    SegmentSpec,
)
from ..series import Series
from .python_class import segments_of

log = logging.getLogger("pacsworker.worker")

PROBABILITY_TYPES = {"probability_mask", "boolean_mask"}
LABEL_TYPES = {"numeric_label_mask"}
POLL_SECONDS = 1.0


class ArterysModel:
    """A remote model speaking the Arterys inference protocol; nothing is loaded in the worker."""

    def __init__(self, settings: ArterysModelSettings):
        if not settings.url:
            raise ValueError("kind arterys needs url: the model server's base URL")
        self.settings = settings
        self.url = settings.url.rstrip("/")
        self.device = "remote"
        self.identity = ModelIdentity(settings.name, settings.version or "arterys")
        self.http = requests.Session()

    # -- talking to the server -------------------------------------------------------------

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.settings.wait_seconds
        last, logged = "", False
        while True:
            try:
                answer = self.http.get(f"{self.url}/healthcheck", timeout=min(10.0, self.settings.request_timeout_seconds))
                if answer.status_code == 200 and answer.text.strip() == "READY":
                    return
                last = f"healthcheck answered {answer.status_code} {answer.text.strip()[:80]!r}"
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise ModelRunError(f"Arterys model server at {self.url} not ready after "
                                    f"{self.settings.wait_seconds:g} s: {last}")
            if not logged:
                log.info("model %s: waiting for %s to be READY (%s)", self.settings.name, self.url, last)
                logged = True
            time.sleep(POLL_SECONDS)

    def _post(self, files: list[Path]) -> requests.Response:
        request = {"request": "post", "route": "/", "inference_command": self.settings.inference_command}
        parts = [("application/json", json.dumps(request).encode())]
        parts += [("application/dicom", path.read_bytes()) for path in files]
        body, content_type = encode_multipart(parts)
        deadline = time.monotonic() + self.settings.wait_seconds
        while True:
            try:
                answer = self.http.post(f"{self.url}/", data=body, headers={"Content-Type": content_type},
                                        timeout=self.settings.request_timeout_seconds)
            except (requests.ConnectionError, requests.Timeout) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if answer.status_code == 200:
                    return answer
                problem = f"HTTP {answer.status_code}: {answer.text.strip()[:200]}"
                if answer.status_code not in (502, 503, 504):
                    raise ModelRunError(f"Arterys model server at {self.url} refused the series: {problem}")
            if time.monotonic() >= deadline:
                raise ModelRunError(f"Arterys model server at {self.url} gave no answer within "
                                    f"{self.settings.wait_seconds:g} s: {problem}")
            log.info("model %s: %s; trying again", self.settings.name, problem)
            time.sleep(POLL_SECONDS)

    def run(self, series: Series) -> ModelResult:
        files = series.source_files()
        self._wait_ready()
        started = time.perf_counter()
        answer = self._post(files)
        log.info("model %s: %d instances answered by %s in %.2f s", self.settings.name, len(files), self.url,
                 time.perf_counter() - started)
        return ArterysAnswer(self.settings, series).read(answer.content, answer.headers.get("Content-Type", ""))


class ArterysAnswer:
    """Reads one answer of the protocol against the series it was asked about."""

    def __init__(self, settings: ArterysModelSettings, series: Series):
        self.settings, self.series = settings, series
        self.index = {(str(s.dataset.SOPInstanceUID), s.frame_number): i for i, s in enumerate(series.volume.sources)}
        self.slices, self.rows, self.columns = series.pixels.shape
        self.configured = {spec.name: spec for output in settings.outputs.values() for spec in segments_of(output)}
        self.box_codes = {label: CodedTerm.from_triple(triple) for output in settings.outputs.values()
                          if output.kind == "boxes" for label, triple in output.values.items()}

    def read(self, body: bytes, content_type: str) -> ModelResult:
        try:
            parts = decode_multipart(body, content_type)
            answer = json.loads(parts[0][1])
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelOutputError(f"the model server's answer is not multipart JSON + binaries: {exc}") from None
        if not isinstance(answer, dict):
            raise ModelOutputError("the model server's JSON part is not an object")
        binaries = [payload for headers, payload in parts[1:]
                    if not headers.get("content-type", "").startswith("text/plain")]
        described = answer.get("parts") or []
        if len(binaries) != len(described):
            raise ModelOutputError(
                f"the model server's answer has {len(binaries)} binary part(s) for {len(described)} entr"
                f"{'y' if len(described) == 1 else 'ies'} in 'parts'"
            )
        result = ModelResult()
        boxes = self._boxes(answer.get("bounding_boxes_2d") or [])
        if boxes is not None:
            result.outputs["boxes"] = boxes
        result.outputs.update(self._masks(described, binaries))
        for key in ("study_ml_json", "series_ml_json"):
            if answer.get(key):
                result.notes.append(f"{key}: {json.dumps(answer[key])[:500]}")
        return result

    def _slice_of(self, what: str, uid, frame) -> int:
        frame = int(frame) if frame not in (None, 0, "") else None
        index = self.index.get((str(uid), frame))
        if index is None and frame in (None, 1):  # frame 1 of a single-frame image is the image
            index = self.index.get((str(uid), None), self.index.get((str(uid), 1)))
        if index is None:
            raise ModelOutputError(f"the model server's {what} names SOPInstanceUID {uid}"
                                   f"{f' frame {frame}' if frame else ''}, which is not an image of the series")
        return index

    def _boxes(self, items) -> Boxes | None:
        if not isinstance(items, list):
            raise ModelOutputError("the model server's bounding_boxes_2d is not a list")
        if not items and self.settings.inference_command != "get-bounding-box-2d":
            return None
        boxes = []
        for number, item in enumerate(items, start=1):
            what = f"box {number}"
            if not isinstance(item, dict) or "SOPInstanceUID" not in item:
                raise ModelOutputError(f"the model server's {what} names no SOPInstanceUID")
            index = self._slice_of(what, item["SOPInstanceUID"], item.get("frame_number"))
            try:
                (c0, r0), (c1, r1) = ([float(v) for v in item[corner]] for corner in ("top_left", "bottom_right"))
            except KeyError as exc:
                raise ModelOutputError(f"the model server's {what} lacks {exc.args[0]!r}") from None
            except (TypeError, ValueError):
                raise ModelOutputError(f"the model server's {what} has corners that are not [column, row]") from None
            label = str(item.get("label") or "finding")
            score = item.get("score", item.get("probability"))
            boxes.append(Box(index, (c0, r0), (c1, r1), label, None if score is None else float(score),
                             self.box_codes.get(label)))
        found = Boxes(tuple(boxes))
        found.check(self.series.pixels.shape, "bounding_boxes_2d")
        return found

    def _spec(self, label: str, number: int) -> SegmentSpec:
        configured = self.configured.get(label)
        if configured is not None:
            return SegmentSpec(number, configured.name, configured.category, configured.property_type,
                               configured.description, configured.color)
        return SegmentSpec(number, label, TISSUE, ANATOMICAL_STRUCTURE)

    def _plane_or_volume(self, number: int, part: dict, payload: bytes) -> tuple[np.ndarray, int | None]:
        """The part's voxels as (slices, rows, columns), or one (rows, columns) plane and its slice."""
        what = f"part {number} ({part.get('label', 'unlabelled')})"
        shape = part.get("binary_data_shape") or {}
        try:
            width, height = int(shape["width"]), int(shape["height"])
        except (KeyError, TypeError, ValueError):
            raise ModelOutputError(f"the model server's {what} has no binary_data_shape width and height") from None
        if (width, height) != (self.columns, self.rows):
            raise ModelOutputError(f"the model server's {what} is {width} x {height}; the images are "
                                   f"{self.columns} x {self.rows} (width x height)")
        if "depth" in shape:
            depth, timepoints = int(shape["depth"]), int(shape.get("timepoints", 1) or 1)
            if timepoints != 1:
                raise ModelOutputError(f"the model server's {what} has {timepoints} timepoints; one is supported")
            if depth != self.slices:
                raise ModelOutputError(f"the model server's {what} has depth {depth}; the series has {self.slices} slices")
            expected = depth * height * width
            if len(payload) != expected:
                raise ModelOutputError(f"the model server's {what} holds {len(payload)} bytes; "
                                       f"{depth} x {height} x {width} uint8 is {expected}")
            return np.frombuffer(payload, dtype=np.uint8).reshape(depth, height, width), None
        image = part.get("dicom_image") or {}
        if "SOPInstanceUID" not in image:
            raise ModelOutputError(f"the model server's {what} has neither depth nor dicom_image")
        index = self._slice_of(what, image["SOPInstanceUID"], image.get("frame_number"))
        if len(payload) != height * width:
            raise ModelOutputError(f"the model server's {what} holds {len(payload)} bytes; "
                                   f"{height} x {width} uint8 is {height * width}")
        return np.frombuffer(payload, dtype=np.uint8).reshape(height, width), index

    def _masks(self, described: list, binaries: list[bytes]) -> dict:
        probabilities: dict[str, np.ndarray] = {}
        labelmaps: list[LabelMap] = []
        for number, (part, payload) in enumerate(zip(described, binaries, strict=True), start=1):
            if not isinstance(part, dict):
                raise ModelOutputError(f"the model server's part {number} is not an object")
            kind = part.get("binary_type")
            series_uid = part.get("SeriesInstanceUID")
            if series_uid and str(series_uid) != self.series.series_uid:
                raise ModelOutputError(f"the model server's part {number} is for series {series_uid}, "
                                       f"not {self.series.series_uid}")
            if kind not in PROBABILITY_TYPES | LABEL_TYPES:
                log.info("model %s: part %d has binary_type %r, which pacsworker does not encode; left out",
                         self.settings.name, number, kind)
                continue
            voxels, index = self._plane_or_volume(number, part, payload)
            label = str(part.get("label") or f"Segment {number}")
            if kind in LABEL_TYPES:
                if index is not None:
                    raise ModelOutputError(f"the model server's part {number}: a numeric_label_mask must be 3D")
                names = part.get("label_map") or {}
                ordered = sorted(names.items(), key=lambda kv: int(kv[0]))
                specs = tuple(self._spec(str(name), int(value)) for value, name in ordered)
                labelmaps.append(LabelMap(voxels.copy(), specs))
                continue
            scale = 255.0 if kind == "probability_mask" else max(1.0, float(voxels.max()))
            target = probabilities.setdefault(label, np.zeros(self.series.pixels.shape, dtype=np.float32))
            if index is None:
                target[:] = np.maximum(target, voxels / scale)
            else:
                target[index] = np.maximum(target[index], voxels / scale)
        outputs: dict = {}
        if probabilities:
            specs = tuple(self._spec(label, number) for number, label in enumerate(probabilities, start=1))
            outputs["probabilities"] = ProbabilityMaps(np.stack(list(probabilities.values())), specs)
        for number, labelmap in enumerate(labelmaps, start=1):
            outputs[f"labels{number}"] = labelmap
        return outputs
