"""``taskforge batch ...``: submit a manifest and follow it, show, report, retry, cancel.

    taskforge batch submit manifest.jsonl [--max-in-flight N] [--dry-run] [--wait [-o report.ndjson]]
    taskforge batch get <id> | list | report <id> [-o FILE|DIR/] | retry <id> | cancel <id>

Exit codes as for tasks: 0 ok (with ``--wait``: every item succeeded), 1 some items failed
or were cancelled, 2 an invalid manifest (the failing lines are printed), 7 ``--timeout``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from taskforge.output import bar, emit

EXIT_OK, EXIT_ITEMS_FAILED = 0, 1


def batch_text(b: dict[str, Any]) -> str:
    c = b.get("counts", {})
    parts = "  ".join(f"{k}={v}" for k, v in c.items() if v)
    return f"{b['id']}  {b['status']:<9}  {b.get('done', 0)}/{b['total']}  {parts}"


class BatchProgress:
    """A redrawn bar of done/total on a terminal, a line per change otherwise (stderr);
    with ``--json`` one JSON line per change on stdout."""

    def __init__(self, args: argparse.Namespace, out: TextIO | None = None) -> None:
        self.json = bool(getattr(args, "json", False))
        self.out = out or (sys.stdout if self.json else sys.stderr)
        self.tty = not self.json and self.out.isatty()
        self.last: Any = None

    def update(self, b: dict[str, Any]) -> None:
        key = (b.get("status"), json.dumps(b.get("counts"), sort_keys=True))
        if key == self.last:
            return
        self.last = key
        pct = int(100 * b.get("done", 0) / max(1, b["total"]))
        if self.json:
            print(json.dumps({"event": "batch", "data": b}), file=self.out, flush=True)
        elif self.tty:
            self.out.write(f"\r{b['id'][:8]}  {bar(pct)} {b.get('done', 0)}/{b['total']}"
                           f"  failed={b['counts'].get('failed', 0)}  {b['status']:<9}")
            self.out.flush()
        else:
            print(batch_text(b), file=self.out, flush=True)

    def done(self) -> None:
        if self.tty and self.last is not None:
            self.out.write("\n")
            self.out.flush()


def _outcome(b: dict[str, Any]) -> int:
    c = b.get("counts", {})
    return EXIT_OK if b["status"] == "completed" and not c.get("failed") and not c.get("cancelled") \
        else EXIT_ITEMS_FAILED


def cmd_submit(args: argparse.Namespace) -> int:
    from taskforge.commands import make_client

    client = make_client(args)
    b = client.batches.submit(args.manifest, max_in_flight=args.max_in_flight,
                              idempotency_key=args.idempotency_key, dry_run=args.dry_run)
    if args.dry_run or not args.wait:
        emit(args, b, f"valid: {b['total']} items {b['types']}" if args.dry_run else batch_text(b))
        return EXIT_OK
    progress = BatchProgress(args)
    final = client.batches.wait(b["id"], timeout_s=args.timeout, on_update=progress.update)
    progress.done()
    if args.output:
        path = client.batches.report(final["id"], args.output)
        emit(args, {"batch": final, "report": str(path)}, f"{batch_text(final)}\nreport saved to {path}")
    else:
        emit(args, final, batch_text(final))
    return _outcome(final)


def cmd_get(args: argparse.Namespace) -> int:
    from taskforge.commands import make_client

    b = make_client(args).batches.get(args.batch_id)
    emit(args, b, batch_text(b))
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from taskforge.commands import make_client

    page = make_client(args).batches.list(status=args.status, limit=args.limit, cursor=args.cursor)
    rows = [batch_text(b) for b in page["items"]]
    if page.get("next_cursor"):
        rows.append(f"(more: --cursor {page['next_cursor']})")
    emit(args, page, "\n".join(rows) or "no batches")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from taskforge.commands import make_client

    client = make_client(args)
    if args.output:
        path = client.batches.report(args.batch_id, args.output)
        emit(args, {"report": str(path)}, str(path))
        return EXIT_OK
    for line in client.batches.report_lines(args.batch_id):  # NDJSON to stdout, pipe-friendly
        if args.failed and line["status"] != "failed":
            continue
        print(json.dumps(line, separators=(",", ":")), flush=False)
    sys.stdout.flush()
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    from taskforge.commands import make_client

    out = make_client(args).batches.retry(args.batch_id)
    emit(args, out, f"re-running {out['retried']} failed item(s)\n{batch_text(out['batch'])}")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from taskforge.commands import make_client

    b = make_client(args).batches.cancel(args.batch_id)
    emit(args, b, batch_text(b))
    return EXIT_OK


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``taskforge batch ...`` on the ``taskforge`` sub-parser action."""
    batch = sub.add_parser("batch", help="batches: a manifest of many tasks").add_subparsers(
        dest="batch_command", required=True)
    p = batch.add_parser("submit", parents=[common], help="submit a manifest (NDJSON, one task per line)")
    p.add_argument("manifest", help="the manifest file: {\"type\", \"payload\", \"ref\"} per line")
    p.add_argument("--max-in-flight", type=int, default=None, help="at most N of its tasks run at once")
    p.add_argument("--idempotency-key", default=None, help="resubmitting with the same key is safe")
    p.add_argument("--dry-run", action="store_true", help="validate only; create nothing")
    p.add_argument("--wait", action="store_true", help="show progress until the batch finishes")
    p.add_argument("-o", "--output", default=None, help="with --wait: save the report here (file or DIR/)")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    p.set_defaults(func=cmd_submit)
    for name, func, helptext in (("get", cmd_get, "show a batch's progress"),
                                 ("retry", cmd_retry, "re-run the failed items"),
                                 ("cancel", cmd_cancel, "cancel a batch")):
        p = batch.add_parser(name, parents=[common], help=helptext)
        p.add_argument("batch_id")
        p.set_defaults(func=func)
    p = batch.add_parser("list", parents=[common], help="list your batches, newest first")
    p.add_argument("--status")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--cursor")
    p.set_defaults(func=cmd_list)
    p = batch.add_parser("report", parents=[common], help="the report: one JSON line per manifest line")
    p.add_argument("batch_id")
    p.add_argument("-o", "--output", default=None, help="save to this file or DIR/ (default: stdout)")
    p.add_argument("--failed", action="store_true", help="only the failed lines (stdout only)")
    p.set_defaults(func=cmd_report)
