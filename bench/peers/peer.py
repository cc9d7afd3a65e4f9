"""One system's side of the peers benchmark, run by bench/peers.py in the benchmark's
virtualenv:

    peer.py SYSTEM prepare                       create its tables
    peer.py SYSTEM enqueue single|bulk N [--work-ms MS] [--chunk C]
                                                 enqueue N tasks; print {"seconds": ...}
    peer.py SYSTEM stamped N --spacing S         enqueue N tasks S seconds apart, each
                                                 carrying its enqueue time (pickup latency)

The database is PEER_DATABASE_URL, Celery's broker PEER_REDIS_URL.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

SYSTEMS = ("procqueue", "pgqueuer", "procrastinate", "celery")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("system", choices=SYSTEMS)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare")
    enqueue = commands.add_parser("enqueue")
    enqueue.add_argument("mode", choices=("single", "bulk"))
    enqueue.add_argument("count", type=int)
    enqueue.add_argument("--work-ms", type=float, default=0)
    enqueue.add_argument("--chunk", type=int, default=1000)
    stamped = commands.add_parser("stamped")
    stamped.add_argument("count", type=int)
    stamped.add_argument("--spacing", type=float, required=True)
    options = parser.parse_args(argv)
    side = importlib.import_module(f"{options.system}_side")
    if options.command == "prepare":
        side.prepare()
    elif options.command == "stamped":
        side.enqueue_stamped(options.count, options.spacing)
    else:
        kwargs_list = [{"work_ms": options.work_ms} if options.work_ms else {} for _ in range(options.count)]
        if options.mode == "bulk":
            if side.enqueue_bulk is None:
                print(json.dumps({"seconds": None}))
                return 0
            seconds = side.enqueue_bulk(kwargs_list, options.chunk)
        else:
            seconds = side.enqueue_single(kwargs_list)
        print(json.dumps({"seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
