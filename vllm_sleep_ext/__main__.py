"""Command line: `python -m vllm_sleep_ext demo|info`."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-sleep-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sleep and wake a small model at both levels, buffers kept and not")
    demo.add_argument("--backend", choices=["auto", "cuda", "host"], default="auto")
    sub.add_parser("info", help="say which backend this machine can use")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every sleep and wake")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")

    if args.command == "info":
        from vllm_sleep_ext import _core

        try:
            _core.cuda_allocator()
            print("CUDA backend: available")
        except RuntimeError as e:
            print(f"CUDA backend: unavailable ({e})")
        print("host backend: available")
        return 0
    from vllm_sleep_ext.demo import run_demo

    return 0 if run_demo(args.backend) else 1


if __name__ == "__main__":
    sys.exit(main())
