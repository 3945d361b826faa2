"""``tgdaemon localdc`` / ``python -m tgdaemon.localdc``: run a local stand-in DC.

Contract: DC k listens on PORT+k-1 (PORT 0 = free ports); once every listener is up the
info file is written atomically as JSON; SIGTERM/SIGINT stop it with exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
from pathlib import Path

from tgdaemon.localdc.server import BANNER, LocalDC

log = logging.getLogger("tgdaemon.localdc.cli")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tgdaemon localdc",
        description="Run a LOCAL STAND-IN for Telegram's data centres (for tests and demos). "
                    "It is NOT Telegram: no real account is ever contacted.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=0, help="port of DC 1; DC k uses PORT+k-1")
    p.add_argument("--dcs", type=int, default=1, help="number of data centres")
    p.add_argument("--state-dir", type=Path, required=True, help="persistent state directory")
    p.add_argument("--info-file", type=Path, required=True, help="JSON file written when up")
    p.add_argument("--code", default="12345",
                   help="fixed login code; 'random' for a random code per request")
    p.add_argument("--control-port", type=int, default=None,
                   help="serve the HTTP/JSON control API on this port (0 = free port)")
    p.add_argument("--mtproxy-secret", default=None, type=_mtproxy_secret,
                   help="also serve as an MTProxy with this secret (32 hex digits, or dd + 32 "
                        "for padded intermediate only)")
    p.add_argument("--mtproxy-port", type=int, default=0,
                   help="port of the MTProxy listener (0 = free port)")
    p.add_argument("--log-level", default="INFO")
    return p


def _mtproxy_secret(value: str) -> str:
    s = value.lower()
    if re.fullmatch(r"(dd)?[0-9a-f]{32}", s) is None:
        # argparse prints this with the option name; the value (a secret) is not echoed.
        raise argparse.ArgumentTypeError("expected 32 hex digits, or dd + 32")
    return s


def write_atomic(path: Path, data: str) -> None:
    """Write via a temp file + rename in the same directory, so readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


async def run(args: argparse.Namespace) -> int:
    code = None if args.code == "random" else args.code
    dc = LocalDC(args.state_dir, dcs=args.dcs, host=args.host, port=args.port, code=code,
                 control_port=args.control_port, mtproxy_secret=args.mtproxy_secret,
                 mtproxy_port=args.mtproxy_port)
    await dc.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        write_atomic(args.info_file, json.dumps(dc.info(), indent=2) + "\n")
        mtproxy = f", MTProxy on {dc.mtproxy_address}" if dc.mtproxy_address else ""
        print(f"{BANNER}; serving {dc.addresses}{mtproxy}; info in {args.info_file}",
              file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await dc.stop()
    log.info("localdc stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dcs < 1:
        print("--dcs must be >= 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(run(args))
    except OSError as exc:
        print(f"localdc: cannot start: {exc}", file=sys.stderr)
        return 1
