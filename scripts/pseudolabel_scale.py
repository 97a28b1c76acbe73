"""Time and memory of nnUNetv2_ssl_pseudolabel over a large synthetic pool (issue #35, item 5).

    python scripts/pseudolabel_scale.py --pool 1000 --work ../scale [--shape 16 32 32] [--sources 1]

Makes a synthetic dataset with POOL unlabeled volumes, plans it, writes CPU-sized plans and untrained model(s),
then runs the command as a subprocess and samples the resident memory of its whole process tree (the command and
nnU-Net's preprocessing workers, from /proc) once a second against the number of cases finished. Prints a
Markdown table (memory after each tenth of the pool, seconds per case) for docs/pseudolabel.md. Untrained
networks cost what trained ones cost: the time is the time of real prediction.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def tree_rss_mb(pid: int) -> float:
    """Resident memory (MB) of ``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=1000)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--shape", type=int, nargs=3, default=[16, 32, 32])
    parser.add_argument("--sources", type=int, default=1, help="folds of the untrained model")
    parser.add_argument("--tta", action="store_true", help="mirroring at prediction (nnU-Net's default)")
    a = parser.parse_args()
    from nnunet_ssl.demo.synthetic import make_synthetic_dataset, save_random_model_folder

    root = a.work.resolve()
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results")}
    os.environ.update(env)
    pp = root / "preprocessed" / "Dataset990_SSLSynthetic"
    if not (pp / "nnUNetPlans_CPU.json").is_file():
        print(f"making {a.pool} synthetic unlabeled volumes of {a.shape}", flush=True)
        make_synthetic_dataset(root / "raw", dataset_id=990, num_train=8, num_unlabeled=a.pool, num_test=1,
                               shape=tuple(a.shape))
        planner_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
        subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", "990", "-c", "3d_fullres", "-np", "2", "-npfp", "2"],
                       env=planner_env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["nnUNetv2_ssl_cpu_plans", "-d", "990"], env=env, check=True, stdout=subprocess.DEVNULL)
    model = save_random_model_folder(pp, root / "results", folds=tuple(range(a.sources)), foreground_bias=1.0,
                                     plans_name="nnUNetPlans_CPU")
    work = root / "work"
    cmd = ["nnUNetv2_ssl_pseudolabel", "-d", "990", "-t", "991", "-o", str(work), "-m", str(model), "-device",
           "cpu", "-npp", "1", "--ignore-below", "0.5", "--overwrite"] + ([] if a.tta else ["--disable_tta"])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    samples: list[tuple[float, int, float]] = []
    scores = work / "scores"
    while proc.poll() is None:
        done = len(list(scores.glob("*.json"))) if scores.is_dir() else 0
        samples.append((time.monotonic() - started, done, tree_rss_mb(proc.pid)))
        if len(samples) % 30 == 0:
            print(f"{samples[-1][0]:7.0f} s  {done:5d}/{a.pool} cases  {samples[-1][2]:7.0f} MB", flush=True)
        time.sleep(1.0)
    if proc.returncode != 0:
        sys.exit(f"nnUNetv2_ssl_pseudolabel failed ({proc.returncode}); rerun it by hand: {' '.join(cmd)}")
    total = time.monotonic() - started
    print(f"\npool {a.pool} volumes of {a.shape[0]}x{a.shape[1]}x{a.shape[2]}, {a.sources} source(s), "
          f"TTA {'on' if a.tta else 'off'}: {total:.0f} s in all\n")
    print("| cases done | elapsed (s) | s per case since the previous row | memory of the process tree (MB) |")
    print("|---|---|---|---|")
    previous = (0.0, 0)
    for k in range(1, 11):
        target = a.pool * k // 10
        row = next((s for s in samples if s[1] >= target), samples[-1])
        peak = max(s[2] for s in samples if s[1] <= row[1])
        rate = (row[0] - previous[0]) / max(1, row[1] - previous[1])
        print(f"| {row[1]} | {row[0]:.0f} | {rate:.2f} | {row[2]:.0f} (peak so far {peak:.0f}) |")
        previous = (row[0], row[1])


if __name__ == "__main__":
    main()
