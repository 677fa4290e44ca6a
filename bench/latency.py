"""Time from a series being declared complete to its SEG and SR being queryable in Orthanc.

    .venv/bin/python bench/latency.py [--rounds 3]

Runs ``pacsworker serve`` (embedded broker) against a real Orthanc; the model's own time and the
other stages come from the job record, so queueing and delivery overhead can be read off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import DICOM_DIR, Orthanc, Pacsworker, free_port, port_open, storescu, wait_until, write_config  # noqa: E402

SERIES = DICOM_DIR / "ct02_philips_ingenuity_headphantom_5mm"
STUDY = "1.3.46.670589.33.1.27492712521914879309.27169771283235650014"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        orthanc = Orthanc(tmp / "orthanc").start()
        port = free_port()
        config = write_config(tmp / "c.yaml", scp={"port": port, "host": "127.0.0.1", "series_quiet_seconds": 1},
                              storage={"data_dir": str(tmp / "data")},
                              destinations=[{"kind": "dicomweb", "url": orthanc.dicomweb_url}])
        serve = Pacsworker(["serve"], config, tmp / "serve.log")
        try:
            wait_until(lambda: port_open(port), 60, what="receiver")
            for round_ in range(args.rounds):
                for study in orthanc.get_json("/studies"):  # empty PACS each round
                    urllib.request.urlopen(urllib.request.Request(f"{orthanc.url}/studies/{study}", method="DELETE"))
                storescu(port, SERIES)
                wait_until(lambda: len(orthanc.study_instances(STUDY)) >= 2, 300, interval=0.05, what="results")
                visible = time.time()
                job = max((json.loads(p.read_text()) for p in (tmp / "data" / "jobs").glob("*.json")), key=lambda j: j["queued_at"])
                rows.append({
                    "complete_to_queryable_s": visible - job["queued_at"],
                    "queue_wait_s": job["started_at"] - job["queued_at"],
                    **{k: v for k, v in job["timings"].items() if k.endswith("_s")},
                    "delivery_s": job["timings"]["delivered_at"] - job["finished_at"] if "delivered_at" in job["timings"] else float("nan"),
                })
        finally:
            serve.stop()
            orthanc.stop()
    print(f"series {SERIES.name}, {args.rounds} rounds (round 1 includes loading the model)")
    for key in rows[0]:
        values = [r[key] for r in rows]
        print(f"  {key:<24} " + "  ".join(f"{v:6.2f}" for v in values) + f"   median {statistics.median(values):.2f}")


if __name__ == "__main__":
    main()
