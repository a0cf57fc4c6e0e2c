"""``taskforge webhooks …``: completion webhooks from the command line.

``add URL [--event E ...]`` (prints the secret once), ``list``, ``rm ID``, ``rotate ID``
(prints the new secret once), ``deliveries ID [--status S] [--limit N]``,
``redeliver ID DELIVERY`` and ``callback-secret`` (the secret that signs the one-off
``--callback-url`` of ``taskforge submit``). Exit codes are the CLI's usual ones.
"""
from __future__ import annotations

import argparse
from typing import Any

from taskforge.output import emit

EVENTS = ("task.succeeded", "task.failed", "task.cancelled", "batch.completed")
DEFAULT_EVENTS = ("task.succeeded", "task.failed", "task.cancelled")


def _client(args: argparse.Namespace) -> Any:
    from taskforge.commands import make_client  # the CLI module imports this one

    return make_client(args)


def _secret_text(ep: dict[str, Any]) -> str:
    return (f"{ep['id']}  {ep.get('url') or '(callbacks)'}\n"
            f"secret: {ep['secret']}\n(shown once: store it where your receiver can read it)")


def cmd_add(args: argparse.Namespace) -> int:
    ep = _client(args).add_webhook(args.url, list(args.event or DEFAULT_EVENTS))
    emit(args, ep, _secret_text(ep))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    items = _client(args).webhooks()["items"]
    lines = [f"{e['id']}  {e.get('url') or '(callbacks)'}  {','.join(e['events']) or '-'}"
             + (f"  previous secret until {e['previous_secret_expires_at']}" if e.get("previous_secret_expires_at")
                else "") for e in items]
    emit(args, {"items": items}, "\n".join(lines) or "no webhooks")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    _client(args).remove_webhook(args.endpoint_id)
    emit(args, {"deleted": args.endpoint_id}, f"deleted {args.endpoint_id}")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    ep = _client(args).rotate_webhook(args.endpoint_id)
    emit(args, ep, _secret_text(ep) + f"\nthe previous secret also signs until {ep['previous_secret_expires_at']}")
    return 0


def cmd_callback_secret(args: argparse.Namespace) -> int:
    ep = _client(args).callback_secret()
    emit(args, ep, _secret_text(ep))
    return 0


def _delivery_line(d: dict[str, Any]) -> str:
    codes = ",".join(str(a["status_code"] if a["status_code"] is not None else "-") for a in d["attempt_log"])
    return f"{d['id']}  {d['event_type']}  {d['status']}  attempts={d['attempts']} [{codes}]  {d['created_at']}"


def cmd_deliveries(args: argparse.Namespace) -> int:
    items = _client(args).webhook_deliveries(args.endpoint_id, limit=args.limit, status=args.status)["items"]
    emit(args, {"items": items}, "\n".join(_delivery_line(d) for d in items) or "no deliveries")
    return 0


def cmd_redeliver(args: argparse.Namespace) -> int:
    d = _client(args).redeliver_webhook(args.endpoint_id, args.delivery_id)
    emit(args, d, f"queued again: {_delivery_line(d)}")
    return 0


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``webhooks`` and its verbs to the CLI's subparsers."""
    wh = sub.add_parser("webhooks", help="completion webhooks (signed callbacks)").add_subparsers(
        dest="webhooks_command", required=True)
    p = wh.add_parser("add", parents=[common], help="register an endpoint (prints its secret once)")
    p.add_argument("url")
    p.add_argument("--event", action="append", choices=EVENTS,
                   help="repeatable; default: task.succeeded, task.failed, task.cancelled")
    p.set_defaults(func=cmd_add)
    wh.add_parser("list", parents=[common], help="list your endpoints").set_defaults(func=cmd_list)
    for name, func, helptext in (("rm", cmd_rm, "delete an endpoint"),
                                 ("rotate", cmd_rotate, "new secret; the old one signs during the grace period")):
        p = wh.add_parser(name, parents=[common], help=helptext)
        p.add_argument("endpoint_id")
        p.set_defaults(func=func)
    p = wh.add_parser("deliveries", parents=[common], help="recent deliveries of an endpoint with their attempts")
    p.add_argument("endpoint_id")
    p.add_argument("--status", choices=("pending", "succeeded", "failed", "dead"))
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_deliveries)
    p = wh.add_parser("redeliver", parents=[common], help="send a finished (e.g. dead) delivery again")
    p.add_argument("endpoint_id")
    p.add_argument("delivery_id")
    p.set_defaults(func=cmd_redeliver)
    wh.add_parser("callback-secret", parents=[common],
                  help="create or rotate the secret signing --callback-url deliveries").set_defaults(
        func=cmd_callback_secret)
