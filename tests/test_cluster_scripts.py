"""The scripts under cluster/scripts, run for real: the two-node rehearsal (ray start +
ray job submit) and the README's first command in a fresh clone with a new venv."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without a Ray address or venv of ours leaking into the script."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST")) and k != "VIRTUAL_ENV"}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", **extra}


def test_two_node_rehearsal_trains_across_both_nodes_and_stops_them(tmp_path: Path) -> None:
    gcs, dashboard, metrics = free_ports(3)
    env = clean_env(
        VIRTUAL_ENV=str(Path(sys.executable).parent.parent), REHEARSAL_OUT=str(tmp_path / "rehearsal"), REHEARSAL_STEPS="2",
        REHEARSAL_GCS_PORT=str(gcs), REHEARSAL_DASHBOARD_PORT=str(dashboard), REHEARSAL_METRICS_PORT=str(metrics),
    )
    result = subprocess.run(
        ["bash", str(REPO / "cluster/scripts/rehearse_multinode.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=540
    )
    log = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, log
    assert "ok: " in result.stdout and "last logged step 2 of 2" in result.stdout, log
    assert "2 train workers on 2 nodes" in result.stdout, log
    # both nodes are gone: nothing listens on the head's port any more
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", gcs)) != 0
    # and the address file `ray start` wrote is gone with them (a later local Ray's state API reads it)
    current = Path("/tmp/ray/ray_current_cluster")
    assert not (current.exists() and current.read_text().strip().endswith(f":{gcs}")), current.read_text()


def readme_first_command() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no bash block"
    commands = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 1, commands
    return commands[0]


@pytest.mark.skipif(shutil.which("git") is None or shutil.which("python3.11") is None, reason="needs git and python3.11")
def test_readme_first_command_works_in_a_fresh_clone(tmp_path: Path) -> None:
    """A clean clone of the committed tree + a new virtual environment + the README's first
    command (setup, synthetic data, training, serving, one synthesis over HTTP)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    http, metrics = free_ports(2)
    env = clean_env(QUICKSTART_STEPS="2", QUICKSTART_SCENES="48", QUICKSTART_PORT=str(http), QUICKSTART_METRICS_PORT=str(metrics), QUICKSTART_KEEP="0")
    command = readme_first_command()
    result = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    log = result.stdout[-5000:] + result.stderr[-3000:]
    assert result.returncode == 0, log
    image = clone / "out/quickstart/synthesized.png"
    assert image.is_file(), log
    assert f"image:            {image}" in result.stdout, log
    assert "serving metrics:  http://127.0.0.1:" in result.stdout
    from PIL import Image

    with Image.open(image) as im:  # size=original: the sample label map's size
        with Image.open(REPO / "samples/ade20k/ADEChallengeData2016/annotations/training/ADE_train_00000001.png") as labels:
            assert im.size == labels.size
