"""``python -m bench [--mode quick|full] [--only MODULE ...]``: run the figure modules,
print a table, and merge the figures into ``bench/results/latest.json``.

Each run uses its own database (``<database>_bench_<run>``, dropped afterwards), Redis
prefix and broker name (``ctx.settings``), so runs never touch a ``make dev`` stack or
each other; figure modules delete the RabbitMQ topology they declare. Every connection goes to the loopback services of the settings.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
import uuid
from pathlib import Path

import psycopg
import psycopg.conninfo
import psycopg.sql

from bench.harness import BenchContext, Figure, table, write_results
from shared import db, redisclient
from shared.settings import load_settings

SKIP = {"harness", "__main__", "chart", "stackproc", "peers", "ledger"}


def modules() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in SKIP)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--mode", choices=("quick", "full"), default="quick",
                        help="quick (default) or full: more rounds and samples")
    parser.add_argument("--only", nargs="*", default=None, help=f"figure modules to run (of {modules()})")
    args = parser.parse_args(argv)
    chosen = args.only or modules()
    unknown = set(chosen) - set(modules())
    if unknown:
        parser.error(f"unknown figure modules: {sorted(unknown)}")

    base = load_settings()
    run_id = uuid.uuid4().hex[:8]
    # A database of its own per run (dropped afterwards): concurrent runs never collide.
    name = str(psycopg.conninfo.conninfo_to_dict(base.database_url).get("dbname") or "taskforge") + f"_bench_{run_id}"
    settings = base.replace(
        env="test",
        database_url=psycopg.conninfo.make_conninfo(base.database_url, dbname=name),
        broker_name=f"bench-{run_id}",
        redis_prefix=f"tfbench:{run_id}",
        broker_backend="rabbitmq",
        db_pool_max=max(base.db_pool_max, 10),
    )
    db.ensure_database(settings.database_url)
    db.migrate(settings.database_url)
    ctx = BenchContext(mode=args.mode, settings=settings)

    figures: list[Figure] = []
    try:
        for mod_name in chosen:
            mod = importlib.import_module(f"bench.{mod_name}")
            run = getattr(mod, "run", None)
            if run is None:
                continue
            print(f"== {mod_name} ({args.mode})", file=sys.stderr, flush=True)
            started = time.monotonic()
            figures.extend(run(ctx))
            print(f"== {mod_name} took {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    finally:
        db.close_pools()
        with psycopg.connect(psycopg.conninfo.make_conninfo(base.database_url, dbname="postgres"),
                             autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psycopg.sql.Identifier(name)))
        redisclient.drop_prefix(settings.redis_url, settings.redis_prefix)  # the run's own keys
    path = write_results(figures, args.mode)
    print(table(figures))
    print(f"\nwritten to {path}")
    from bench.chart import write_chart  # matplotlib: bench/requirements.txt

    print(f"chart: {write_chart(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
