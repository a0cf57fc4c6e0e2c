"""The ``taskforge`` command: operator verbs (``migrate``, ``dev``) and the user client
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
        if args.func in (_cmd_migrate, _cmd_dev):
            return int(args.func(args) or 0)
        return cli_client.run(args)
    except SettingsError as exc:
        print(f"taskforge: {exc}", file=sys.stderr)
        return cli_client.EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
