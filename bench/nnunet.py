"""kind nnunet against nnU-Net's own command line on the same CT series (ct02: 28 slices, 512 x 512).

    .venv/bin/python bench/nnunet.py [--rounds 3]

The model: a real nnU-Net v2 trained-model folder (3d_fullres, fold 0), made first with nnU-Net's
plan, preprocess and train on a toy dataset of ct02's extent (28 x 96 x 96 at 5 x 2.4 x 2.4 mm;
tests/nnunet_train.py: a few training iterations, which change the weights, not the work), in a
temporary folder. nnU-Net's defaults at inference (mirroring, step 0.5), CPU.

- theirs: what a researcher runs without pacsworker, per series: ``dcm2niix`` to a NIfTI, then
  ``nnUNetv2_predict_from_modelfolder`` (a fresh process that loads the model; ``-npp 1 -nps 1``,
  the fewest processes, on this 2-core machine).
- ours, first job: a fresh process that loads the series, loads the model and runs it.
- ours, warm: each later job of that worker process: series loaded, model run (the model stays loaded).
- ours, whole job: the warm job through ``run_model`` (checks, SEG and SR encoding, validation).

Medians of the rounds, wall-clock and CPU seconds (all threads and child processes: on a shared
machine CPU time varies less); peak memory is the highest sum of RSS over each side's process
tree. The load average is printed with them. The label maps of both sides are compared once.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from receive import PeakRSS  # noqa: E402

from conftest import DICOM_DIR  # noqa: E402

CT02 = DICOM_DIR / "ct02_philips_ingenuity_headphantom_5mm"
BIN = Path(sys.executable).parent


def ours(model: Path, rounds: int, labels_out: Path) -> dict:
    """In this process: the first job (model load included), then warm jobs; seconds."""
    import numpy as np

    from pacsworker.config import ModelSettings
    from pacsworker.worker.runtime import get_model, run_model
    from pacsworker.worker.series import Series
    from pacsworker.worker.volume import load_series

    settings = ModelSettings(name="bench", kind="nnunet", source=str(model), device="cpu")
    files = sorted(CT02.glob("*.dcm"))
    started, cpu = time.perf_counter(), time.process_time()
    result = get_model(settings).run(Series(load_series(files)))
    first, first_cpu = time.perf_counter() - started, time.process_time() - cpu
    np.save(labels_out, next(iter(result.outputs.values())).array)
    warm, warm_cpu = [], []
    for _ in range(rounds):
        started, cpu = time.perf_counter(), time.process_time()
        get_model(settings).run(Series(load_series(files)))
        warm.append(time.perf_counter() - started)
        warm_cpu.append(time.process_time() - cpu)
    started = time.perf_counter()
    outcome = run_model(files, settings)
    whole = time.perf_counter() - started
    return {"first": first, "first_cpu": first_cpu, "warm": statistics.median(warm),
            "warm_cpu": statistics.median(warm_cpu), "whole": whole, "timings": outcome.timings}


def run_measured(command: list[str], env: dict | None = None) -> int:
    """Run a command to its end; the peak RSS (kB) of its process tree."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with PeakRSS(process.pid) as rss:
        _, errors = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {errors.decode()[-2000:]}")
    return rss.peak_kb


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def theirs(model: Path, work: Path, env: dict) -> tuple[float, float, int]:
    """dcm2niix, then nnUNetv2_predict_from_modelfolder: seconds, CPU seconds, and the higher peak RSS
    (kB) of the two."""
    work.mkdir()
    started, cpu = time.perf_counter(), children_cpu()
    converted = run_measured([str(BIN / "dcm2niix"), "-z", "i", "-b", "n", "-f", "ct_0000", "-o", str(work), str(CT02)])
    predicted = run_measured([str(BIN / "nnUNetv2_predict_from_modelfolder"), "-i", str(work), "-o", str(work / "out"),
                              "-m", str(model), "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    return time.perf_counter() - started, children_cpu() - cpu, max(converted, predicted)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ours", nargs=2, metavar=("MODEL", "LABELS"), help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    if args.ours:
        print(json.dumps(ours(Path(args.ours[0]), args.rounds, Path(args.ours[1]))))
        return
    import numpy as np

    from pacsworker.worker.volume import load_series
    from test_nnunet import make_trained_models, nnunet_folders, on_series_grid

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = nnunet_folders(tmp)
        started = time.perf_counter()
        model = make_trained_models(env, ["3d_fullres:0"], shape=(28, 96, 96), spacing=(5.0, 2.4, 2.4)) \
            / "nnUNetTrainer__nnUNetPlans__3d_fullres"
        print(f"model made in {time.perf_counter() - started:.0f} s (plan, preprocess, train)")
        child = subprocess.Popen([sys.executable, __file__, "--rounds", str(args.rounds), "--ours", str(model),
                                  str(tmp / "ours.npy")], stdout=subprocess.PIPE, text=True)
        with PeakRSS(child.pid) as our_rss:
            out, _ = child.communicate()
        measured = json.loads(out.strip().splitlines()[-1])
        with tempfile.TemporaryDirectory() as scratch:
            rounds = [theirs(model, Path(scratch) / f"r{round_}", env) for round_ in range(args.rounds)]
            reference = on_series_grid(Path(scratch) / "r0" / "out" / "ct.nii.gz",
                                       load_series(sorted(CT02.glob("*.dcm"))))
        equal = np.array_equal(np.load(tmp / "ours.npy"), reference)
        median, median_cpu = statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)
        their_peak = max(r[2] for r in rounds)
        print(f"ct02 (28 x 512 x 512), nnU-Net 3d_fullres fold 0, CPU, medians of {args.rounds} rounds; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"  theirs: dcm2niix + nnUNetv2_predict_from_modelfolder  {median:7.2f} s ({median_cpu:.2f} s CPU)   "
              f"peak RSS {their_peak / 1024:6.0f} MB")
        print(f"  ours, first job (model load included)             {measured['first']:7.2f} s "
              f"({measured['first_cpu']:.2f} s CPU)   peak RSS {our_rss.peak_kb / 1024:6.0f} MB (whole run)")
        print(f"  ours, warm job (series + nnU-Net)                 {measured['warm']:7.2f} s "
              f"({measured['warm_cpu']:.2f} s CPU)")
        print(f"  ours, whole warm job (+ checks, SEG, SR, validation) {measured['whole']:7.2f} s  "
              f"{', '.join(f'{k} {v:.2f}' for k, v in measured['timings'].items())}")
        print(f"  ratio ours / theirs: warm {measured['warm'] / median:.2f} (CPU {measured['warm_cpu'] / median_cpu:.2f}), "
              f"first job {measured['first'] / median:.2f} (CPU {measured['first_cpu'] / median_cpu:.2f}), "
              f"whole warm job {measured['whole'] / median:.2f} (below 1 = faster)")
        print(f"  label maps equal voxel for voxel: {'yes' if equal else 'NO'}")


if __name__ == "__main__":
    main()
