"""The user side of the ``taskforge`` command: accounts, submitting, watching, results.

Built on :mod:`taskforge.client`. Payload flags are generated from the task types' JSON
Schemas (``events/schemas/payloads/<type>.json``), so the CLI offers exactly what the gateway
accepts: ``--width``, ``--max-width``, ``--page-size``... (enums become choices).

Exit codes (stable, for scripts):

====  ==========================================================
0     success (for ``--wait``/``watch``: the task succeeded)
1     the task ended ``failed`` or ``cancelled``
2     usage error, or the request was invalid (400, 413, 415, 422)
3     not logged in, bad credentials, or forbidden (401, 403)
4     not found (404)
5     server or network error (5xx, 429, unreachable)
6     conflict (409: already finished, idempotency key reused...)
7     timed out waiting (``--timeout``)
130   interrupted (Ctrl-C)
====  ==========================================================
"""
from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path
from typing import Any

import events
from events.catalog import TASK_TYPES
from taskforge.client import ApiError, Client
from taskforge.credentials import CredentialStore
from taskforge.output import Progress, emit, print_task, print_tasks

EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE, EXIT_AUTH, EXIT_NOT_FOUND, EXIT_SERVER, EXIT_CONFLICT, EXIT_TIMEOUT = range(8)
EXIT_INTERRUPTED = 130
EPILOG = """exit codes: 0 ok, 1 task failed or cancelled, 2 usage or invalid request, 3 not logged in or
forbidden, 4 not found, 5 server or network error, 6 conflict, 7 timed out waiting, 130 interrupted.
Server URLs: --server / TASKFORGE_URL (gateway), --stream-url / TASKFORGE_STREAM_URL (status stream)."""
SCHEMA_DIR = Path(events.__file__).resolve().parent / "schemas" / "payloads"  # read as data: no jsonschema import


def exit_code(exc: ApiError) -> int:
    """The documented exit code for an API failure."""
    if exc.status in (400, 413, 415, 422):
        return EXIT_USAGE
    if exc.status in (401, 403):
        return EXIT_AUTH
    if exc.status == 404:
        return EXIT_NOT_FOUND
    if exc.status == 409:
        return EXIT_CONFLICT
    return EXIT_SERVER


# --- wiring -------------------------------------------------------------------------------
def _settings() -> Any:
    from shared.settings import get_settings

    return get_settings()


def _urls(args: argparse.Namespace) -> tuple[str, str]:
    s = _settings()
    url = args.server or s.url or s.public_base_url
    stream = args.stream_url or s.stream_url or s.status_stream_url
    return url.rstrip("/"), stream.rstrip("/")


def _store() -> CredentialStore:
    return CredentialStore.in_config_dir(_settings().config_dir or None)


def make_client(args: argparse.Namespace, *, anonymous: bool = False) -> Client:
    """A client for the chosen server with the cached credentials (refreshes are saved)."""
    url, stream = _urls(args)
    store = _store()
    api_key = getattr(args, "api_key", None)
    # An explicit --api-key wins over a cached login.
    saved = {} if anonymous or api_key else store.get(url)
    client = Client(url, stream_url=stream, access_token=saved.get("access_token"),
                    refresh_token=saved.get("refresh_token"), api_key=api_key,
                    on_tokens=lambda pair: store.update(url, pair))
    return client


def _password(args: argparse.Namespace, confirm: bool = False) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    pw = getpass.getpass("Password: ")
    if confirm and getpass.getpass("Password (again): ") != pw:
        raise SystemExit("passwords do not match")
    return pw


# --- commands -----------------------------------------------------------------------------
def cmd_signup(args: argparse.Namespace) -> int:
    password = _password(args, confirm=not args.password_stdin)
    client = make_client(args, anonymous=True)
    user = client.signup(args.email, password)
    client.login(args.email, password)
    _store().update(client.url, {"email": args.email})
    emit(args, user, f"signed up and logged in as {user['email']}")
    return EXIT_OK


def cmd_login(args: argparse.Namespace) -> int:
    client = make_client(args, anonymous=True)
    client.login(args.email, _password(args))
    _store().update(client.url, {"email": args.email})
    emit(args, {"email": args.email, "url": client.url}, f"logged in to {client.url} as {args.email}")
    return EXIT_OK


def cmd_logout(args: argparse.Namespace) -> int:
    client = make_client(args)
    try:
        if client.access_token:
            client.logout()
    finally:
        _store().forget(client.url)
    emit(args, {"logged_out": True}, "logged out")
    return EXIT_OK


def cmd_whoami(args: argparse.Namespace) -> int:
    me = make_client(args).me()
    emit(args, me, f"{me['email']} ({me['id']})")
    return EXIT_OK


def build_payload(task_type: str, args: argparse.Namespace, client: Client | None) -> dict[str, Any]:
    """The payload from the generated flags; ``--file`` is uploaded first (needs ``client``)."""
    schema = _schema(task_type)
    payload: dict[str, Any] = {}
    for name in schema.get("properties", {}):
        if name == "source":
            continue
        value = getattr(args, f"p_{name}", None)
        if value is not None:
            payload[name] = value
    if getattr(args, "html_file", None):
        if payload.get("html"):
            raise ApiError(400, "usage", "give --html or --html-file, not both")
        payload["html"] = Path(args.html_file).read_text(encoding="utf-8")
    if "source" in schema.get("properties", {}):
        if args.file:
            assert client is not None
            up = client.upload(args.file)
            payload["source"] = {"upload_id": up["id"]}
        elif args.upload_id:
            payload["source"] = {"upload_id": args.upload_id}
        elif args.source_url:
            payload["source"] = {"url": args.source_url}
    return payload


def cmd_submit(args: argparse.Namespace) -> int:
    client = make_client(args)
    payload = build_payload(args.task_type, args, client)
    task = client.submit(args.task_type, payload, idempotency_key=args.idempotency_key,
                         callback_url=args.callback_url)
    if not args.wait:
        print_task(args, task)
        return EXIT_OK
    return _follow(args, client, task, download_to=args.output)


def _follow(args: argparse.Namespace, client: Client, task: dict[str, Any], download_to: str | None,
            *, json_lines: bool = False) -> int:
    """Show progress until the task is terminal; download on success if asked.

    ``json_lines`` (``watch --json``): every change is already printed as a JSON line, so
    the final state is not printed again."""
    progress = Progress(args, json_lines=json_lines)
    final = client.wait(task["id"], timeout_s=args.timeout, on_update=progress.update)
    progress.done()
    ok = final["status"] == "succeeded"
    if ok and download_to is not None:
        path = client.download(final["id"], download_to)
        emit(args, {"task": final, "path": str(path)}, f"saved {path}")
    elif not (json_lines and args.json):
        print_task(args, final)
    return EXIT_OK if ok else EXIT_TASK_FAILED


def cmd_watch(args: argparse.Namespace) -> int:
    client = make_client(args)
    if args.task_id is None:
        for ev in client.events(last_event_id=args.last_event_id):
            emit(args, {"event": ev.event, "id": ev.id, "data": ev.data},
                 _line(ev.data) if ev.event == "task" else f"[{ev.event}] {ev.data}")
        return EXIT_OK
    task = client.get(args.task_id)
    return _follow(args, client, task, download_to=args.output, json_lines=True)


def _line(task: Any) -> str:
    if not isinstance(task, dict):
        return str(task)
    return f"{task.get('id')}  {task.get('type')}  {task.get('status')}  {task.get('progress')}%"


def cmd_get(args: argparse.Namespace) -> int:
    print_task(args, make_client(args).get(args.task_id))
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    client = make_client(args)
    page = client.list(status=args.status, task_type=args.type, limit=args.limit, cursor=args.cursor)
    print_tasks(args, page)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    print_task(args, make_client(args).cancel(args.task_id))
    return EXIT_OK


def cmd_download(args: argparse.Namespace) -> int:
    path = make_client(args).download(args.task_id, args.output or ".")
    emit(args, {"path": str(path)}, str(path))
    return EXIT_OK


def cmd_dlq_list(args: argparse.Namespace) -> int:
    page = make_client(args).dead_letters(limit=args.limit, cursor=args.cursor, task_id=args.task_id)
    lines = [f"{d['id']}  {d['event_type']}  task={d.get('task_id')}  code={(d.get('error') or {}).get('code')}"
             f"  replays={d.get('replay_count')}  {d.get('received_at')}" for d in page["items"]]
    if page.get("next_cursor"):
        lines.append(f"(more: --cursor {page['next_cursor']})")
    emit(args, page, "\n".join(lines) or "no dead letters")
    return EXIT_OK


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    out = make_client(args).replay_dead_letter(args.dead_letter_id)
    emit(args, out, f"replayed as event {out['event_id']}" + (f"; task {out['task']['id']} is "
                                                              f"{out['task']['status']}" if out.get("task") else ""))
    return EXIT_OK


# --- parser -------------------------------------------------------------------------------
def _schema(task_type: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / f"{task_type}.json").read_text(encoding="utf-8"))


def _add_payload_flags(p: argparse.ArgumentParser, task_type: str) -> None:
    props = _schema(task_type).get("properties", {})
    if "source" in props:
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--file", help="a local file: uploaded first, then used as the source")
        src.add_argument("--upload-id", help="an earlier upload's id")
        src.add_argument("--url", dest="source_url", help="an http(s) URL the worker fetches")
    for name, spec in props.items():
        if name == "source":
            continue
        kw: dict[str, Any] = {"dest": f"p_{name}", "help": spec.get("description")}
        if "enum" in spec:
            kw["choices"] = spec["enum"]
        elif spec.get("type") == "integer":
            kw["type"] = int
        elif spec.get("type") == "number":
            kw["type"] = float
        if "default" in spec:
            kw["help"] = f"{kw['help'] or ''} (server default: {spec['default']})".strip()
        p.add_argument("--" + name.replace("_", "-"), **kw)
    if "html" in props:
        p.add_argument("--html-file", help="read the HTML document from this file")


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("server and output")
    g.add_argument("--server", dest="server", default=None, help="gateway URL (env TASKFORGE_URL)")
    g.add_argument("--stream-url", default=None, help="status-stream URL (env TASKFORGE_STREAM_URL)")
    g.add_argument("--api-key", default=None, help="authenticate with an API key instead of a login")
    g.add_argument("--json", action="store_true", help="machine-readable JSON output")
    return common


def add_commands(sub: Any) -> None:
    """Register the user commands on the ``taskforge`` sub-parser action."""
    common = _common()
    creds = argparse.ArgumentParser(add_help=False)
    creds.add_argument("--email", required=True)
    creds.add_argument("--password-stdin", action="store_true", help="read the password from stdin")

    p = sub.add_parser("signup", parents=[common, creds], help="create an account (and log in)")
    p.set_defaults(func=cmd_signup)
    p = sub.add_parser("login", parents=[common, creds], help="log in; credentials are cached per server")
    p.set_defaults(func=cmd_login)
    sub.add_parser("logout", parents=[common], help="revoke the session and forget it").set_defaults(func=cmd_logout)
    sub.add_parser("whoami", parents=[common], help="show the logged-in user").set_defaults(func=cmd_whoami)

    submit = sub.add_parser("submit", help="submit a task").add_subparsers(dest="task_type", required=True)
    for task_type in TASK_TYPES:
        p = submit.add_parser(task_type, parents=[common], help=_schema(task_type).get("title"))
        _add_payload_flags(p, task_type)
        p.add_argument("--wait", action="store_true", help="show progress until done, then download the result")
        p.add_argument("-o", "--output", default=None, help="with --wait: where to save the result (file or dir)")
        p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
        p.add_argument("--idempotency-key", default=None, help="resubmitting with the same key is safe")
        p.add_argument("--callback-url", default=None,
                       help="POST a signed completion callback here (see `taskforge webhooks callback-secret`)")
        p.set_defaults(func=cmd_submit)

    p = sub.add_parser("watch", parents=[common], help="follow a task (progress bar) or, without id, all tasks")
    p.add_argument("task_id", nargs="?")
    p.add_argument("-o", "--output", default=None, help="download the result here when it succeeds")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--last-event-id", default=None, help="resume the all-tasks stream after this position")
    p.set_defaults(func=cmd_watch)
    for name, func, helptext in (("get", cmd_get, "show a task"), ("cancel", cmd_cancel, "cancel a task")):
        p = sub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("task_id")
        p.set_defaults(func=func)
    p = sub.add_parser("list", parents=[common], help="list your tasks, newest first")
    p.add_argument("--status")
    p.add_argument("--type")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--cursor")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("download", parents=[common], help="download a task's result")
    p.add_argument("task_id")
    p.add_argument("-o", "--output", default=None, help="file or directory (default: here)")
    p.set_defaults(func=cmd_download)

    from taskforge import batch_commands

    batch_commands.add_commands(sub, common)
    dlq = sub.add_parser("dlq", help="dead letters (admins)").add_subparsers(dest="dlq_command", required=True)
    p = dlq.add_parser("list", parents=[common], help="list dead-lettered events, newest first")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--cursor")
    p.add_argument("--task-id")
    p.set_defaults(func=cmd_dlq_list)
    p = dlq.add_parser("replay", parents=[common], help="re-publish a dead-lettered event")
    p.add_argument("dead_letter_id")
    p.set_defaults(func=cmd_dlq_replay)

    from taskforge import webhooks as webhook_commands

    webhook_commands.add_commands(sub, common)


def run(args: argparse.Namespace) -> int:
    """Run a user command, mapping failures to the documented exit codes."""
    try:
        return int(args.func(args) or 0)
    except ApiError as exc:
        _fail(args, exc.code, exc.message, exc.details)
        return exit_code(exc)
    except TimeoutError as exc:
        _fail(args, "timeout", str(exc))
        return EXIT_TIMEOUT
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        _fail(args, "usage", str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _fail(args: argparse.Namespace, code: str, message: str, details: Any = None) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": code, "message": message, "details": details}}), file=sys.stderr)
        return
    print(f"taskforge: {message}", file=sys.stderr)
    for d in details or []:
        if isinstance(d, dict) and "lines" in d:  # an invalid batch manifest: the summary
            print(f"  failing lines ({d.get('count')}): {', '.join(map(str, d['lines']))}", file=sys.stderr)
        elif isinstance(d, dict):
            where = f"line {d['line']}: " if "line" in d else ""
            print(f"  {where}{d.get('field')}: {d.get('message')}", file=sys.stderr)
    if code in ("unauthorized", "not_logged_in", "invalid_token", "token_expired", "token_revoked"):
        print("  (log in with: taskforge login --email you@example.com)", file=sys.stderr)
