"""The per-trainer process of the throughput measurement: ``python -m nnunet_ssl.evaluation.throughput_worker SPEC
OUT`` measures one trainer (:func:`.throughput_measure.measure_trainer`) and writes its ``TrainerTiming`` as JSON.
A fresh process per trainer keeps the peaks of memory apart and builds each trainer as ``nnUNetv2_train`` does."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import traceback
from dataclasses import asdict

from tqdm import tqdm

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.evaluation.throughput_measure import TrainerTiming, measure_trainer


def _worker(spec_file: str, out_file: str) -> int:
    """Entry of the per-trainer process: measures one trainer and writes its TrainerTiming as JSON."""
    with open(spec_file) as f:
        spec = json.load(f)
    log = open(spec["log"], "a")
    try:
        # nnU-Net prints plans and log lines to stdout; keep them in the log so the progress bars stay readable
        with contextlib.redirect_stdout(log):
            result = measure_trainer(spec["trainer"], spec["dataset"], spec["configuration"], spec["plans"],
                                     spec["fold"], spec["device"], spec["warmup"], spec["iterations"],
                                     scratch_results=spec.get("scratch_results"),
                                     at_fraction=spec.get("at_fraction", 0.5))
    except SSLInputError as e:
        result = TrainerTiming(spec["trainer"], status="skipped", reason=e.message)
    except Exception as e:  # reported in the table; the traceback stays in the log
        traceback.print_exc(file=log)
        result = TrainerTiming(spec["trainer"], status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0])
    finally:
        log.close()
    with open(out_file, "w") as f:
        json.dump(asdict(result), f)
    return 0


def run_in_subprocess(trainer: str, spec: dict, scratch: str, env: dict[str, str]) -> TrainerTiming:
    """Measures ``trainer`` in a fresh process (``spec``: the arguments of ``measure_trainer``); a process that dies
    is reported as failed, with the end of its log on stderr."""
    spec_file, out_file = os.path.join(scratch, f"{trainer}.spec.json"), os.path.join(scratch, f"{trainer}.json")
    log_file = os.path.join(scratch, f"{trainer}.log")
    with open(spec_file, "w") as f:
        json.dump({**spec, "trainer": trainer, "log": log_file}, f)
    proc = subprocess.run([sys.executable, "-m", "nnunet_ssl.evaluation.throughput_worker", spec_file, out_file],
                          env=env, stdout=subprocess.PIPE, text=True)
    if os.path.isfile(out_file):
        with open(out_file) as f:
            data = json.load(f)
        result = TrainerTiming(**data)
    else:
        result = TrainerTiming(trainer, status="failed", reason=f"worker process exited with {proc.returncode}")
    if result.status == "failed" and os.path.isfile(log_file):
        with open(log_file) as f:
            tail = f.read()[-3000:]
        tqdm.write(f"--- {trainer} failed; end of its log:\n{tail}{proc.stdout[-2000:]}", file=sys.stderr)
    return result


if __name__ == "__main__":
    # started by run_in_subprocess, never by a user
    if len(sys.argv) != 3 or not sys.argv[1].endswith(".json"):
        sys.exit("usage: nnUNetv2_ssl_throughput ... (this module's __main__ is the internal per-trainer worker)")
    sys.exit(_worker(sys.argv[1], sys.argv[2]))
