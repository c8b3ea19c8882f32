"""``python -m train_job --config cluster/configs/tiny.yaml [--set key=value ...]`` (or ``spade-train``).

Without a Ray address (``RAY_ADDRESS`` or ``--address``) it starts a local Ray and trains
there; under ``ray job submit`` the job joins the cluster. Rerunning with the same
``storage.path`` and ``storage.name`` resumes that run from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .callbacks import Callback
from .config import TrainConfig, load_train_config

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


RAY_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")  # where `ray start --head` records its address


def dead_recorded_head(path: Path = RAY_ADDRESS_FILE) -> str | None:
    """The address in Ray's address file when nothing answers there any more (a head that was
    stopped without `ray stop`), else None. A local Ray's state API reads that file, and Ray
    Train's placement-group cleaner then waits about 12 s at the end of every run."""
    import socket

    try:
        address = path.read_text().strip()
    except OSError:
        return None
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except (OSError, ValueError):
        return address
    return None


def check_training_data(cfg: TrainConfig) -> Any:
    """The prepared shards (``train_job.shards.Shards``) after checking them against the config:
    their label layout against ``model.labels``, the eval split when eval is on. Needs no Ray,
    so spade-train reports a mismatch before it starts one."""
    from .shards import open_shards
    from .validation import check_eval_data

    shards = open_shards(cfg.data.shards, cfg.data.split)
    if shards.labels.semantic_nc != cfg.model.labels.semantic_nc or shards.labels.label_nc != cfg.model.labels.label_nc:
        raise ValueError(
            f"the shards in {cfg.data.shards} hold {shards.labels.dataset} labels (label_nc {shards.labels.label_nc}, "
            f"instance maps {shards.labels.instance_edges}) but model.labels says label_nc {cfg.model.labels.label_nc}, "
            f"instance_edges {cfg.model.labels.instance_edges}"
        )
    check_eval_data(cfg)  # eval.split in the manifest, with eval.num_images pairs (when eval is on)
    return shards


def build_trainer(cfg: TrainConfig, *, callbacks: Sequence[Callback] = (), console: bool = False) -> Any:
    """The TorchTrainer for ``cfg`` (Ray must be initialised); ``callbacks`` (``train_job.callbacks``)
    run on every worker; ``console``: rank 0 copies its output to the run's console.log
    (``train_job.console``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from .pipeline import build_dataset

    shards = check_training_data(cfg)
    dataset = build_dataset(
        cfg.data.shards, split=cfg.data.split, preprocess=cfg.data.preprocess, train=True, seed=cfg.data.seed,
        decode_cpus=cfg.data.decode_cpus,
    )
    from .trainer import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.to_dict(), "num_examples": shards.count, "callbacks": list(callbacks),
                           "console": console},
        scaling_config=ray.train.ScalingConfig(**cfg.scaling.ray_kwargs()),
        datasets={"train": dataset},
        run_config=ray.train.RunConfig(
            name=cfg.storage.name,
            storage_path=cfg.storage.path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spade-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training YAML (see cluster/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    parser.add_argument("--resume", help="start from this training checkpoint directory")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    # bench/dashboard_cost.py on 2 cores: the dashboard adds 1 CPU s/min to an idle local Ray
    # and nothing measurable to a training run (median step 0.43 s either way): on by default
    parser.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=True,
                        help="with a local Ray, start its dashboard (:8265, or the next free port) and print its URL")
    args = parser.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        if args.resume:
            cfg = replace(cfg, storage=replace(cfg.storage, resume_from=str(Path(args.resume).resolve())))
        check_training_data(cfg)  # before a Ray starts: a wrong data path or label layout is said at once
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import ray

    from spade_core.locations import is_remote

    from .console import follow
    from .trainer import run_dir, total_steps

    address = args.address or os.environ.get("RAY_ADDRESS")
    # A local Ray and a run folder the driver can read: show the run (its messages and a
    # progress bar) and keep Ray's own output in files. Else Ray's output, as Ray prints it.
    quiet = not address and not is_remote(cfg.storage.path) and not ray.is_initialized()
    folder = run_dir(cfg)
    if not address and (dead := dead_recorded_head()):
        print(f"spade-train: {RAY_ADDRESS_FILE} names {dead}, a Ray head that no longer answers: each Ray Train run "
              f"waits ~12 s on it at shutdown; delete the file (or `ray stop`)", file=sys.stderr)
    if quiet:
        driver_log = _ray_logs_to(folder / "ray-driver.log")
        context = ray.init(address="local", include_dashboard=args.dashboard, log_to_driver=False, configure_logging=False)
        _ray_logs_to(folder / "ray-driver.log")
        print(f"spade-train: run {folder}")
        print(f"  Ray's logs: {driver_log} and {os.path.join(context.address_info['session_dir'], 'logs')}")
        if args.dashboard and context.dashboard_url:
            print(f"  Ray dashboard: http://{context.dashboard_url}")
    elif not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(address="local", include_dashboard=args.dashboard)
    try:
        trainer = build_trainer(cfg, console=quiet)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if quiet:
        _ray_logs_to(folder / "ray-driver.log")  # again: importing Ray Data gave it a console handler
        total = total_steps(cfg, trainer.train_loop_config["num_examples"])  # the count build_trainer read
        with follow(folder, total=total, every=cfg.logging.every_steps) as shown:
            result = trainer.fit()
            shown.reached((result.metrics or {}).get("step"))
    else:
        result = trainer.fit()
    if result.error is not None:
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    latest = result.checkpoint.path if result.checkpoint is not None else None
    print(f"run directory: {os.path.join(cfg.storage.path, cfg.storage.name)}")
    print(f"latest checkpoint (serve_app loads this): {latest}")
    return 0


def _ray_logs_to(path: Path) -> Path:
    """Every library logger of the driver (Ray, Ray Data, Ray Train, Python warnings) into
    ``path`` only: console handlers removed, records passed to the root logger's file handler.
    Called again after imports that install handlers of their own (Ray Data does on import)."""
    import logging

    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if not any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in root.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and (name == "ray" or name.startswith("ray.") or name == "py.warnings"):
            for h in list(logger.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    logger.removeHandler(h)
            logger.propagate = True
    return path


if __name__ == "__main__":
    sys.exit(main())
