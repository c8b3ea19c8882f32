"""``python -m spade_core.convert NVLABS_DIR OUT_DIR``: a reference checkpoint into our format."""

from __future__ import annotations

import argparse
import sys

from .checkpoint import load_checkpoint, save_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spade_core.convert",
        description="Convert an NVlabs/SPADE checkpoint directory (latest_net_*.pth + opt.txt) "
        "into spade-ray's format (config.json + *.safetensors).",
    )
    parser.add_argument("source", help="reference checkpoint directory (or one of ours, to re-save)")
    parser.add_argument("out", help="output directory (created if needed)")
    parser.add_argument("--no-discriminator", action="store_true", help="leave the discriminator out (serving needs none)")
    args = parser.parse_args(argv)
    try:
        model = load_checkpoint(args.source)
        out = save_checkpoint(model, args.out, include_discriminator=not args.no_discriminator)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    nets = [n for n in ("generator", "encoder", "discriminator") if getattr(model, n) is not None]
    if args.no_discriminator and "discriminator" in nets:
        nets.remove("discriminator")
    print(f"wrote {out} ({', '.join(nets)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
