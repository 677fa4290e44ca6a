"""Model runtime: pacsworker's torchscript adapter (sliding window) against a bare loop of the same
forward passes over the same tiles, in the same process; and the warm second job against the first.

    .venv/bin/python bench/model_runtime.py [--rounds 3] [--device cpu|cuda]

Anchor for the overhead: the network alone, called on the tiles the sliding window visits
(same roi, overlap, batch), no transforms, no stitching. Model load time is excluded throughout.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import DICOM_DIR, REPO  # noqa: E402

from pacsworker.config import ModelSettings  # noqa: E402
from pacsworker.worker import runtime  # noqa: E402
from pacsworker.worker.adapters.torchscript import image_for_pipeline  # noqa: E402
from pacsworker.worker.series import Series  # noqa: E402
from pacsworker.worker.volume import load_series  # noqa: E402

SPLEEN = REPO.parent / "shared" / "models" / "monai_spleen_unet_torchscript" / "model.ts"
ROI, OVERLAP, BATCH = (96, 96, 32), 0.25, 4


def settings(device: str) -> ModelSettings:
    return ModelSettings(
        name="spleen", kind="torchscript", source=str(SPLEEN), device=device,
        pipeline={
            "pre": [{"name": "ScaleIntensityRanged", "args": {"a_min": -57, "a_max": 164, "b_min": 0.0, "b_max": 1.0, "clip": True}}],
            "inferer": {"name": "sliding_window", "roi_size": list(ROI), "overlap": OVERLAP, "sw_batch_size": BATCH},
            "post": [{"name": "AsDiscreted", "args": {"argmax": True}}],
        },
        outputs={"seg": {"kind": "labelmap", "segments": [{"label": 1, "name": "Spleen"}]}},
    )


def tile_starts(size: int, roi: int) -> list[int]:
    if size <= roi:
        return [0]
    step = max(1, int(roi * (1 - OVERLAP)))
    starts = list(range(0, size - roi + 1, step))
    if starts[-1] != size - roi:
        starts.append(size - roi)
    return starts


def bare_loop(network, image: torch.Tensor, device: str) -> float:
    """The forward passes alone over the same tiles (padded to the roi where the image is smaller)."""
    shape = image.shape[1:]
    pad = [max(0, r - s) for r, s in zip(ROI, shape)]
    padded = torch.nn.functional.pad(image, [0, pad[2], 0, pad[1], 0, pad[0]])
    starts = list(itertools.product(*(tile_starts(s + p, r) for s, p, r in zip(shape, pad, ROI))))
    tiles = [padded[:, x:x + ROI[0], y:y + ROI[1], z:z + ROI[2]] for x, y, z in starts]
    started = time.perf_counter()
    with torch.inference_mode():
        for index in range(0, len(tiles), BATCH):
            batch = torch.stack(tiles[index:index + BATCH]).to(device)
            network(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--series", type=Path, default=DICOM_DIR / "ct02_philips_ingenuity_headphantom_5mm")
    args = parser.parse_args()
    files = sorted(args.series.glob("*.dcm"))
    series = Series(load_series(files))
    config = settings(args.device)

    started = time.perf_counter()
    model = runtime.get_model(config)
    load_s = time.perf_counter() - started
    jobs = []
    for _ in range(2):  # first and second job on a warm model (load excluded)
        outcome = runtime.run_model(files, config)
        jobs.append(outcome.timings["model_s"])

    image = model.pre({"image": image_for_pipeline(series)})["image"]
    adapter, window, bare = [], [], []
    for _ in range(args.rounds):  # interleaved
        bare.append(bare_loop(model.network, image, args.device))
        started = time.perf_counter()
        with torch.inference_mode():
            model.forward(image[None])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        window.append(time.perf_counter() - started)
        started = time.perf_counter()
        model.run(series)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        adapter.append(time.perf_counter() - started)
    a, w, b = statistics.median(adapter), statistics.median(window), statistics.median(bare)
    tiles = len(list(itertools.product(*(tile_starts(max(s, r), r) for s, r in zip(image.shape[1:], ROI)))))
    print(f"series {args.series.name}: {tuple(series.pixels.shape)}, device {args.device}, torch {torch.__version__}")
    print(f"sliding window roi {ROI}, overlap {OVERLAP}, batch {BATCH}: {tiles} tiles; model load {load_s:.2f} s")
    print(f"  bare forward loop            median {b:.3f} s")
    print(f"  adapter's sliding window     median {w:.3f} s  overhead {100 * (w - b) / b:+.1f} % (ratio {w / b:.3f}): "
          "tiling, padding, stitching")
    print(f"  whole adapter run            median {a:.3f} s  overhead {100 * (a - b) / b:+.1f} % (ratio {a / b:.3f}): "
          "plus the pipeline's own pre/post transforms (here ScaleIntensityRanged, AsDiscreted argmax)")
    print(f"  first job model time {jobs[0]:.3f} s, second {jobs[1]:.3f} s (ratio second/first {jobs[1] / jobs[0]:.2f})")


if __name__ == "__main__":
    main()
