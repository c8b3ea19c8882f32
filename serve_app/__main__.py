"""``spade-serve``: serve a checkpoint over HTTP on a local Ray (or the cluster in RAY_ADDRESS).

    spade-serve --checkpoint out/runs/tiny                 # http://127.0.0.1:8000, metrics on :8080
    spade-serve --checkpoint out/runs/tiny --select best   # the run's best checkpoint (checkpoint.best_by)
    spade-serve --config my_args.yaml --set precision=bf16 --port 8000

``--config`` is a YAML of the app's args (``serve_app.config.ServeConfig``); flags and
``--set key=value`` override it. Runs until interrupted, then shuts the app down.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from spade_core.precision import DTYPES
from spade_core.runs import SELECTS

from .config import ServeConfig, load_serve_config

DEFAULT_PORT = 8000
DEFAULT_METRICS_PORT = 8080


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="spade-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint dir, training run dir (newest checkpoint_*), or URI")
    parser.add_argument("--select", choices=SELECTS,
                        help="of a training run: latest (the newest checkpoint_*, default) or best (best/, by checkpoint.best_by)")
    parser.add_argument("--config", help="YAML of app args (ServeConfig)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a dotted key")
    parser.add_argument("--precision", choices=list(DTYPES))
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                        help="Ray's metrics export port for a Ray started here (our series and Ray Serve's)")
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a Ray started here")
    parser.add_argument("--no-block", action="store_true", help="deploy and return (the app keeps running in Ray)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        config: ServeConfig = load_serve_config(args.config, args.overrides, checkpoint=args.checkpoint, select=args.select,
                                                precision=args.precision)
        from .checkpoints import resolve_checkpoint

        resolved = {m.name: resolve_checkpoint(m.checkpoint, m.select) for m in config.model_entries()}
    except (ValueError, FileNotFoundError) as exc:
        print(f"spade-serve: {exc}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from .app import build_app

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(logging_level="WARNING")
        else:
            ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING",
                     _metrics_export_port=args.metrics_port)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(config), name="spade", route_prefix="/")
    url = f"http://{args.host}:{args.port}"
    metrics_port = ray.nodes()[0].get("MetricsExportPort", args.metrics_port)
    served = "\n".join(f"  model    {name}: {path}" for name, path in resolved.items())
    print(f"serving\n{served}\n  studio   {url}/\n  API      {url}/v1/synthesize   (docs: {url}/docs)\n"
          f"  metrics  http://127.0.0.1:{metrics_port}/metrics", flush=True)
    if args.no_block:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
