"""A model server for the tests that speaks the Arterys inference protocol as its SDK documents it.

It computes real answers from the pixels it is sent: bone (HU above about 300) as a 3D
probability mask, as 2D masks per image, as boxes or as a numeric label mask; or, when told to,
answers wrongly (a missing binary part, a short buffer, an unknown SOPInstanceUID, another
series). It refuses instances that do not arrive in slice order along the normal.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO

import numpy as np
import pydicom


def bone_probability(hu: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(hu.astype(np.float64) - 300.0) / 50.0))


def _split(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    boundary = re.search(r'boundary="?([^";]+)"?', content_type).group(1).encode()
    parts = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, _, payload = chunk.strip(b"\r\n").partition(b"\r\n\r\n")
        kind = re.search(rb"content-type:\s*([^\r\n]+)", head, re.IGNORECASE)
        parts.append((kind.group(1).decode() if kind else "", payload))
    return parts


def _join(parts: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "answer-" + uuid.uuid4().hex
    out = BytesIO()
    for kind, payload in parts:
        out.write(f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode() + payload + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/related; boundary={boundary}"


class ArterysServer:
    """``mode``: boxes, mask3d, mask2d, labels, or a malformed answer: missing_part, short_buffer,
    unknown_uid, other_series. ``ready_after``: how many healthchecks answer 'LOADING' first."""

    def __init__(self):
        self.mode = "mask3d"
        self.ready_after = 0
        self.healthchecks = 0
        self.requests: list[dict] = []
        handler = self._handler()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> "ArterysServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path != "/healthcheck":
                    return self._send(404, b"not found", "text/plain")
                server.healthchecks += 1
                ready = server.healthchecks > server.ready_after
                self._send(200, b"READY" if ready else b"LOADING", "text/plain")

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                parts = _split(body, self.headers["Content-Type"])
                request = json.loads(parts[0][1])
                images = [pydicom.dcmread(BytesIO(payload)) for _, payload in parts[1:]]
                server.requests.append({"json": request, "instances": len(images),
                                        "kinds": [kind for kind, _ in parts]})
                normal = np.cross(*np.reshape([float(v) for v in images[0].ImageOrientationPatient], (2, 3)))
                along = [float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)) for ds in images]
                if along != sorted(along):
                    return self._send(400, b"instances are not in slice order", "text/plain")
                answer, binaries = server.answer(images)
                payload, kind = _join([("application/json", json.dumps(answer).encode())] +
                                      [("application/binary", b) for b in binaries] +
                                      [("text/plain", ("0" * 64 + ":" + "1" * 64).encode())])
                self._send(200, payload, kind)

        return Handler

    def answer(self, images) -> tuple[dict, list[bytes]]:
        hu = np.stack([ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
                       for ds in images])
        probability = np.rint(bone_probability(hu) * 255).astype(np.uint8)
        depth, height, width = hu.shape
        series = str(images[0].SeriesInstanceUID)
        answer: dict = {"protocol_version": "1.0", "parts": []}
        binaries: list[bytes] = []
        mode = self.mode
        if mode in ("boxes", "unknown_uid"):
            boxes = []
            for ds, plane in zip(images, hu):
                rows, columns = np.nonzero(plane >= 300)
                if len(rows):
                    boxes.append({"label": "Bone", "SOPInstanceUID": str(ds.SOPInstanceUID),
                                  "top_left": [int(columns.min()), int(rows.min())],
                                  "bottom_right": [int(columns.max()) + 1, int(rows.max()) + 1],
                                  "probability": 0.75})
            if mode == "unknown_uid":
                boxes[0]["SOPInstanceUID"] = "1.2.3.4.5.6.7.8.9"
            answer["bounding_boxes_2d"] = boxes
            return answer, binaries
        if mode == "mask2d":
            for ds, plane in reversed(list(zip(images, probability))):  # any order: each names its image
                if plane.any():
                    answer["parts"].append({"label": "Bone", "binary_type": "probability_mask",
                                            "binary_data_shape": {"width": width, "height": height},
                                            "dicom_image": {"SOPInstanceUID": str(ds.SOPInstanceUID), "frame_number": 1}})
                    binaries.append(plane.tobytes())
            return answer, binaries
        if mode == "labels":
            labels = np.where(hu >= 300, 1, np.where(hu >= -100, 2, 0)).astype(np.uint8)
            answer["parts"].append({"label": "Tissues", "binary_type": "numeric_label_mask",
                                    "binary_data_shape": {"timepoints": 1, "depth": depth, "width": width, "height": height},
                                    "SeriesInstanceUID": series, "label_map": {"1": "Bone", "2": "Soft tissue"}})
            return answer, [labels.tobytes()]
        part = {"label": "Bone", "binary_type": "probability_mask", "probability_threshold": 0.5,
                "binary_data_shape": {"timepoints": 1, "depth": depth, "width": width, "height": height},
                "SeriesInstanceUID": "1.2.3.999" if mode == "other_series" else series}
        answer["parts"].append(part)
        data = probability.tobytes()  # (slice, row, column) in C order: the column index fastest
        if mode == "short_buffer":
            data = data[:-width]
        binaries.append(data)
        if mode == "missing_part":
            answer["parts"].append(dict(part, label="Bone copy"))
        return answer, binaries
