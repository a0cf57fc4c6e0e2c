"""The ``taskforge`` command: operator verbs (``migrate``, ``doctor``, ``dev``) and the user client
(``login``, ``submit``, ``watch``, ... in ``taskforge.commands``)."""
from __future__ import annotations

import argparse
import sys

from shared.settings import get_settings


def _cmd_migrate(args: argparse.Namespace) -> int:
    from shared import db

    settings = get_settings()
    if db.ensure_database(settings.database_url):
        print("created database")
    applied = db.migrate(settings.database_url)
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    """Check the invariants on the configured database, storage and Redis: 0 when the
    promise holds, 1 when a check failed (warnings alone still exit 0)."""
    import json

    from shared import doctor

    report = doctor.run(get_settings(), grace_s=args.grace_s)
    print(json.dumps(report.to_dict(), indent=1, default=str) if args.json else doctor.render(report))
    return 0 if report.ok else 1


def _cmd_dev(args: argparse.Namespace) -> int:
    from infra.runtime.supervisor import run_dev

    return run_dev(args.config)


def build_parser() -> argparse.ArgumentParser:
    from taskforge import commands as cli_client

    parser = argparse.ArgumentParser(prog="taskforge", description="TaskForge command line",
                                     epilog=cli_client.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("migrate", help="create the database if needed and apply SQL migrations")
    p.set_defaults(func=_cmd_migrate)
    p = sub.add_parser("doctor", help="check that no task is stuck, lost, doubled or holding a secret (exit 1 if so)")
    p.add_argument("--grace-s", type=float, default=600.0, metavar="S",
                   help="slack past each bound before a task counts as stuck (default 600)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_doctor)
    p = sub.add_parser("dev", help="run the whole stack locally in the foreground")
    p.add_argument("--config", default=None, help="runtime config file (default: infra/runtime/taskforge.yaml)")
    p.set_defaults(func=_cmd_dev)
    cli_client.add_commands(sub)  # the user commands: login, submit, watch, get, list, ...
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; user commands return the exit codes documented in ``taskforge.commands``."""
    from shared.settings import SettingsError
    from taskforge import commands as cli_client

    args = build_parser().parse_args(argv)
    try:
        if args.func in (_cmd_migrate, _cmd_dev, _cmd_doctor):
            return int(args.func(args) or 0)
        return cli_client.run(args)
    except SettingsError as exc:
        print(f"taskforge: {exc}", file=sys.stderr)
        return cli_client.EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
