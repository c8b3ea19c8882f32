"""``spade-eval``: FID between image folders / statistics files, and a checkpoint's evaluation on a split.

    spade-eval fid PATH PATH --inception pt_inception-2015-12-05-6726825d.pth [--dims N] [--batch-size N] [--device D]
    spade-eval fid --save-stats IMAGE_DIR OUT.npz --inception ...
    spade-eval run --checkpoint CKPT --data SHARDS --out DIR [--inception W] [--segmenter S | --oracle] ...

``fid`` is a drop-in for ``python -m pytorch_fid`` (same arguments, same ``FID:  <value>``
line, same ``--save-stats IN OUT`` form), with the Inception weight file given by path: it is
never downloaded. ``run`` evaluates through Ray Data (:mod:`train_job.evaluate`) on the
cluster at ``--address`` / ``RAY_ADDRESS``, else on a new local Ray (no dashboard); a Ray
that is already initialised in the process is used as it is. Input errors print one line
on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from spade_core.runs import SELECTS

from .eval_inputs import EvalError, EvalOptions, foreign_inception_message, missing_inception_message

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, like the other input errors
        self.exit(2, f"error: {message} (see --help)\n")


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _inception_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inception", metavar="PATH",
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (from its GitHub release fid_weights); checked by sha256")
    p.add_argument("--allow-any-inception", action="store_true",
                   help="accept other weights of the same layout (a test facility: such FIDs compare with nothing published)")
    p.add_argument("--dims", type=int, default=2048, choices=[64, 192, 768, 2048],
                   help="Inception features (default 2048, pool3: the standard FID)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="spade-eval",
                description="FID between image folders / statistics files, and a checkpoint's evaluation on a split.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    fid = sub.add_parser("fid", help="FID of two image folders / .npz files (pytorch-fid's CLI)",
                         description="FID between two directories of images and/or .npz statistics, as python -m pytorch_fid.")
    fid.add_argument("path", nargs=2, help="directories of images or .npz statistics; with --save-stats: input and output")
    fid.add_argument("--batch-size", type=int, default=50, help="images per Inception batch (default 50)")
    fid.add_argument("--num-workers", type=int, default=None,
                     help="accepted for pytorch-fid compatibility (images are read in this process)")
    fid.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: cuda when available)")
    fid.add_argument("--save-stats", action="store_true",
                     help="write the first path's statistics to the second path (.npz, pytorch-fid's keys) instead")
    _inception_args(fid)

    run = sub.add_parser("run", help="evaluate a checkpoint on a prepared split (Ray Data)",
                         description="Generate a split's images with a checkpoint and score them: FID and KID with --inception, "
                                     "mIoU and pixel accuracy with --segmenter or --oracle. Writes DIR/eval.json and DIR/index.html.")
    run.add_argument("--checkpoint", required=True, help="a checkpoint directory (ours or NVlabs') or a training run directory")
    run.add_argument("--select", choices=SELECTS, default="latest",
                     help="of a training run: latest (its newest checkpoint_*, default) or best (best/, by checkpoint.best_by)")
    run.add_argument("--data", required=True, help="prepared shards (train_job.prepare's --out: a path or URI)")
    run.add_argument("--split", default="val", help="split to evaluate (default val)")
    run.add_argument("--out", required=True, metavar="DIR", help="eval.json, index.html and images/ (replaced)")
    _inception_args(run)
    segmenter_group = run.add_mutually_exclusive_group()
    segmenter_group.add_argument("--segmenter", metavar="PATH", help="TorchScript or torch.export (.pt2) segmenter: RGB [0, 1] in, logits out")
    segmenter_group.add_argument("--oracle", action="store_true", help="the synthetic scenes' oracle segmenter (train_job.synthetic)")
    run.add_argument("--segmenter-offset", type=int, default=None,
                     help="dataset id = output channel + offset (default 1 for ADE20K's 150 outputs, else 0)")
    run.add_argument("--num-images", type=int, default=None, help="the split's first N pairs (default: all)")
    run.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="the generator's (Inception and segmenter: fp32)")
    run.add_argument("--seed", type=int, default=0, help="seeds the random style codes of VAE models (default 0)")
    run.add_argument("--batch-size", type=int, default=16, help="images per actor call (default 16)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="auto: one actor per GPU when the cluster has GPUs, else CPU actors")
    run.add_argument("--concurrency", type=int, default=None, help="evaluation actors (default: one per GPU / per CPU slot)")
    run.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (and torch threads) per CPU actor (default 1)")
    run.add_argument("--decode-cpus", type=float, default=1.0, help="CPUs per read/decode task (default 1)")
    run.add_argument("--samples", type=int, default=16, help="rows on the results page (default 16)")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local Ray)")
    run.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return p


# ---------------------------------------------------------------------------------------
# fid


def _fid(args: argparse.Namespace) -> int:
    import torch

    from spade_core.metrics import fid_of_paths, load_fid_inception, save_statistics, statistics_of_path
    from spade_core.metrics.inception import FID_WEIGHTS_FILE, FID_WEIGHTS_SHA256, FID_WEIGHTS_URL, file_sha256

    if args.batch_size < 1:
        return _fail(f"--batch-size must be >= 1, got {args.batch_size}")
    first, second = args.path
    inputs = [first] if args.save_stats else [first, second]
    for p in inputs:
        if not os.path.exists(p):
            return _fail(f"invalid path: {p} does not exist")
    target = None
    if args.save_stats:
        if os.path.exists(second):
            return _fail(f"existing output file: {second}")
        target = second if second.endswith(".npz") else second + ".npz"  # numpy's savez adds it in pytorch-fid
    if args.inception is None:
        return _fail(
            f"--inception PATH is required: FID needs pytorch-fid's {FID_WEIGHTS_FILE} ({FID_WEIGHTS_URL}); it is never downloaded"
        )
    weights = Path(args.inception)
    if not weights.is_file():
        return _fail(missing_inception_message(weights))
    if not args.allow_any_inception and (digest := file_sha256(weights)) != FID_WEIGHTS_SHA256:
        return _fail(foreign_inception_message(weights, digest))
    try:
        device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            return _fail(f"--device {args.device}: torch sees no CUDA device")
    except RuntimeError as exc:
        return _fail(f"--device {args.device}: {exc}")
    try:
        model = load_fid_inception(weights, device=device, allow_any_inception=True)  # the hash was checked above
        if target is not None:
            print(f"Saving statistics for {first}")
            save_statistics(target, statistics_of_path(first, model, dims=args.dims, batch_size=args.batch_size, device=device))
            return 0
        result = fid_of_paths([first, second], model, dims=args.dims, batch_size=args.batch_size, device=device)
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    print("FID: ", result.fid)  # pytorch-fid's line, two spaces and all
    return 0


# ---------------------------------------------------------------------------------------
# run


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .eval_inputs import prepare_evaluation
    from .eval_report import summary_lines, write_results
    from .evaluate import run_evaluation

    opts = EvalOptions(
        checkpoint=args.checkpoint, select=args.select, data=args.data, out=args.out, split=args.split, inception=args.inception,
        allow_any_inception=args.allow_any_inception, dims=args.dims, segmenter=args.segmenter,
        segmenter_offset=args.segmenter_offset, oracle=args.oracle, num_images=args.num_images, precision=args.precision,
        seed=args.seed, batch_size=args.batch_size, device=args.device, concurrency=args.concurrency,
        cpus_per_actor=args.cpus_per_actor, decode_cpus=args.decode_cpus, samples=args.samples,
    )
    try:
        plan = prepare_evaluation(opts)  # every input checked and loaded before Ray starts
    except EvalError as exc:
        return _fail(str(exc))
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)

    import ray

    started_here = False
    if not ray.is_initialized():
        address = args.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:  # a new local Ray, without the dashboard (on small machines it competes for the CPU)
            ray.init(address="local", include_dashboard=False, log_to_driver=True)
        started_here = True
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # Ray Data's per-dataset INFO lines; the driver shows progress
    try:
        result = run_evaluation(plan, progress=not args.no_progress)
        record = write_results(plan, result, command=["spade-eval", *argv])
    except EvalError as exc:
        return _fail(str(exc))
    except Exception as exc:  # a failure inside the pipeline (an actor, a read): its last line
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        return _fail(f"evaluation failed: {type(exc).__name__}: {lines[-1] if lines else ''}", 1)
    finally:
        if started_here:
            ray.shutdown()
    for line in summary_lines(record):
        print(line)
    out = Path(args.out)
    took = record["wall_time_s"]["total"]
    print(f"wrote {out / 'eval.json'} and {out / 'index.html'} ({record['num_images']} images, {took:.1f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed its message (or the help)
        return int(exc.code or 0)
    if args.command == "fid":
        return _fid(args)
    return _run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
