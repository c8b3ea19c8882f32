"""What the Ray dashboard costs on this machine: CPU seconds that a local Ray's processes use
per minute while idle, with the dashboard and without, measured in one run (the choice
behind ``spade-train --dashboard`` being opt-in for a local Ray).

    python bench/dashboard_cost.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=15.0, help="after ray.init, before measuring")
    args = parser.parse_args()
    without = idle_cpu(False, args.seconds, args.warmup)
    with_dashboard = idle_cpu(True, args.seconds, args.warmup)
    cores = os.cpu_count() or 1
    print(f"idle local Ray, {cores} cores, {args.seconds:.0f} s each")
    print(f"  without dashboard: {without:6.1f} CPU s/min ({without / 60 / cores:.1%} of the machine)")
    print(f"  with dashboard:    {with_dashboard:6.1f} CPU s/min ({with_dashboard / 60 / cores:.1%} of the machine)")
    print(f"  the dashboard adds {with_dashboard - without:.1f} CPU s/min: {with_dashboard / max(without, 1e-9):.2f}x an idle Ray")
    return 0


if __name__ == "__main__":
    sys.exit(main())
