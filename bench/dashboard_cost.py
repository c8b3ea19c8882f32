"""What the Ray dashboard costs on this machine, with it and without, measured in one run
(the choice behind ``spade-train`` starting it for a local Ray unless ``--no-dashboard``):
- idle: CPU seconds per minute that a local Ray's processes use;
- under load: a ``spade-train`` run (tiny preset, 2 workers, synthetic shards), its median
  step time, the whole command's wall time and the CPU seconds of its process tree.

    python bench/dashboard_cost.py [--seconds 60] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CODE = """
import os, sys, time, ray
ray.init(address="local", include_dashboard={dashboard}, log_to_driver=False, configure_logging=False)
time.sleep({warmup})
print("ready", flush=True)
time.sleep({seconds})
"""


def _tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(pid))
        except OSError:
            continue
    total, todo, tick = 0.0, [root], os.sysconf("SC_CLK_TCK")
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            continue
    return total


def idle_cpu(dashboard: bool, seconds: float, warmup: float) -> float:
    """CPU seconds per minute of an idle local Ray (driver, raylet, GCS, workers, dashboard)."""
    proc = subprocess.Popen([sys.executable, "-c", CODE.format(dashboard=dashboard, seconds=seconds + 5, warmup=warmup)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        before, t0 = _tree_cpu(proc.pid), time.monotonic()
        time.sleep(seconds)
        used, elapsed = _tree_cpu(proc.pid) - before, time.monotonic() - t0
    finally:
        proc.wait(timeout=120)
    return used / elapsed * 60


def training_cost(dashboard: bool, shards: Path, runs: Path, steps: int) -> dict[str, float]:
    """One ``spade-train`` run: median step seconds (after the first 3), wall and CPU seconds of the command."""
    from drills_train import train_command

    name = "dashboard" if dashboard else "plain"
    cmd = train_command(shards, runs, name, f"optim.max_steps={steps}") + ["--dashboard" if dashboard else "--no-dashboard"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cpu = 0.0
    while proc.poll() is None:  # the tree's CPU, sampled: Ray's processes leave before the driver does
        cpu = max(cpu, _tree_cpu(proc.pid))
        time.sleep(0.5)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"spade-train exited {proc.returncode} ({'with' if dashboard else 'without'} the dashboard)")
    records = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["step_s"] for r in records if "step_s" in r][3:]
    return {"step_s": statistics.median(step_s), "wall_s": wall, "cpu_s": cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=15.0, help="after ray.init, before measuring")
    parser.add_argument("--steps", type=int, default=30, help="training steps of each run under load (0: skip)")
    args = parser.parse_args()
    without = idle_cpu(False, args.seconds, args.warmup)
    with_dashboard = idle_cpu(True, args.seconds, args.warmup)
    cores = os.cpu_count() or 1
    print(f"idle local Ray, {cores} cores, {args.seconds:.0f} s each")
    print(f"  without dashboard: {without:6.1f} CPU s/min ({without / 60 / cores:.1%} of the machine)")
    print(f"  with dashboard:    {with_dashboard:6.1f} CPU s/min ({with_dashboard / 60 / cores:.1%} of the machine)")
    print(f"  the dashboard adds {with_dashboard - without:.1f} CPU s/min: {with_dashboard / max(without, 1e-9):.2f}x an idle Ray")
    if args.steps:
        from drills_train import training_data

        with tempfile.TemporaryDirectory() as tmp:
            shards = training_data(Path(tmp))
            plain = training_cost(False, shards, Path(tmp) / "runs", args.steps)
            dash = training_cost(True, shards, Path(tmp) / "runs", args.steps)
        print(f"spade-train, tiny preset, 2 workers, {args.steps} steps")
        for what, unit in (("step_s", "median step s"), ("wall_s", "command wall s"), ("cpu_s", "command CPU s")):
            print(f"  {unit:15s} without {plain[what]:7.2f}  with {dash[what]:7.2f}  ({dash[what] / plain[what]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
