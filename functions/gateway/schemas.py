"""JSON Schemas of the gateway's request and response bodies.

Routes validate request bodies against these objects and ``openapi.py`` publishes the
very same objects, so the document cannot drift from what the code accepts. Task
payload schemas live in ``events/schemas/payloads/`` (shared with workers and events) and are
referenced from here by name (``#/components/schemas/<Name>``).
"""
from __future__ import annotations

from typing import Any

from events.catalog import STATUSES, TASK_TYPES

MAX_BATCH = 100  # hard ceiling; settings.max_batch_items may lower it


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": list(required),
            "properties": properties, **extra}


_str = {"type": "string"}
_uuid = {"type": "string", "format": "uuid"}
_time = {"type": "string", "format": "date-time"}
_nullable_time = {"type": ["string", "null"], "format": "date-time"}

# --- requests ------------------------------------------------------------------------
# Credentials are only type-checked here; shared.auth.accounts checks email syntax and password
# length with messages that never echo the password.
SIGNUP = _obj({"email": {"type": "string", "maxLength": 254, "description": "becomes the login name"},
               "password": {"type": "string", "description": "at least 8 characters"}},
              ("email", "password"))
LOGIN = _obj({"email": _str, "password": _str}, ("email", "password"))
REFRESH = _obj({"refresh_token": _str}, ("refresh_token",))
LOGOUT = _obj({"refresh_token": {"type": "string", "description": "also revoke this session's refresh tokens"}})
CALLBACK_URL = {"type": "string", "minLength": 1, "maxLength": 2048,
                "description": "one-off completion callback, signed with your callback secret "
                               "(POST /webhooks/callback-secret); must resolve to public addresses"}
TASK_SUBMIT = _obj({"type": {"enum": list(TASK_TYPES)}, "payload": {"type": "object"},
                    "callback_url": CALLBACK_URL}, ("type", "payload"),
                   description="The payload is validated against the schema of its type "
                               "(ResizeImagePayload, CompressVideoPayload, GeneratePdfPayload).")
BATCH_SUBMIT = _obj({"tasks": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH,
                               "items": {"description": "a TaskSubmission, checked item by item"}}}, ("tasks",))
API_KEY_CREATE = _obj({"name": {"type": "string", "minLength": 1, "maxLength": 100}}, ("name",))
SUBMITTED_EVENT_DATA = _obj({"type": {"enum": list(TASK_TYPES)}, "payload": {"type": "object"}},
                            ("type", "payload"))

# --- responses -----------------------------------------------------------------------
ERROR = _obj({"error": _obj({"code": _str, "message": _str,
                             "details": {"description": "field errors (a list of FieldError) or other context"}},
                            ("code", "message"))}, ("error",))
FIELD_ERROR = _obj({"field": _str, "message": _str}, ("field", "message"))
USER = _obj({"id": _uuid, "email": _str}, ("id", "email"))
TOKENS = _obj({"access_token": _str, "refresh_token": _str, "token_type": {"const": "Bearer"},
               "expires_in": {"type": "integer", "description": "seconds until the access token expires"}},
              ("access_token", "refresh_token", "token_type", "expires_in"))
UPLOAD = _obj({"id": _uuid, "size": {"type": "integer", "description": "bytes"}, "content_type": _str,
               "sha256": _str, "filename": {"type": ["string", "null"]}, "created_at": _time},
              ("id", "size", "content_type"))
TASK = _obj({
    "id": _uuid, "type": {"enum": list(TASK_TYPES)}, "status": {"enum": list(STATUSES)},
    "progress": {"type": "integer", "minimum": 0, "maximum": 100},
    "payload": {"type": "object"},
    "result": {"type": ["object", "null"], "description": "{key, content_type, size, ...} once succeeded"},
    "error": {"type": ["object", "null"], "description": "{code, message} once failed"},
    "attempts": {"type": "integer"}, "created_at": _time, "updated_at": _time,
}, ("id", "type", "status", "progress", "payload", "result", "error", "attempts", "created_at", "updated_at"))
TASK_SUMMARY = {**TASK, "description": "a Task without its payload (GET /tasks/{id} has it)",
                "required": [r for r in TASK["required"] if r != "payload"],
                "properties": {k: v for k, v in TASK["properties"].items() if k != "payload"}}
TASK_PAGE = _obj({"items": {"type": "array", "items": ref("TaskSummary")},
                  "next_cursor": {"type": ["string", "null"], "description": "pass as ?cursor= for the next page"}},
                 ("items", "next_cursor"))
BATCH_RESULT = _obj({"items": {"type": "array", "items": _obj({
    "index": {"type": "integer"}, "status": {"enum": [202, 422]},
    "task": ref("Task"), "error": ref("ErrorDetail")}, ("index", "status"))},
    "accepted": {"type": "integer"}, "rejected": {"type": "integer"}}, ("items", "accepted", "rejected"))
API_KEY = _obj({"id": _uuid, "name": _str, "prefix": {"type": "string", "description": "first characters of the key"},
                "created_at": _time, "last_used_at": _nullable_time, "revoked_at": _nullable_time},
               ("id", "name", "prefix", "created_at"))
API_KEY_CREATED = {**API_KEY, "required": [*API_KEY["required"], "key"],
                   "properties": {**API_KEY["properties"],
                                  "key": {"type": "string", "description": "shown once; store it now"}}}
API_KEY_LIST = _obj({"items": {"type": "array", "items": ref("ApiKey")}}, ("items",))
HEALTH = {"type": "object", "properties": {"status": _str, "checks": {"type": "object"}}, "required": ["status"]}

# Named schemas published under #/components/schemas (the task payloads are added there
# from events/schemas/payloads/ by openapi.py).
COMPONENTS: dict[str, dict[str, Any]] = {
    "Signup": SIGNUP, "Login": LOGIN, "Refresh": REFRESH, "Logout": LOGOUT,
    "TaskSubmission": TASK_SUBMIT, "BatchSubmission": BATCH_SUBMIT, "ApiKeyCreate": API_KEY_CREATE,
    "TaskSubmittedData": SUBMITTED_EVENT_DATA,
    "Error": ERROR, "ErrorDetail": ERROR["properties"]["error"], "FieldError": FIELD_ERROR,
    "User": USER, "Tokens": TOKENS, "Upload": UPLOAD, "Task": TASK, "TaskSummary": TASK_SUMMARY,
    "TaskPage": TASK_PAGE,
    "BatchResult": BATCH_RESULT, "ApiKey": API_KEY, "ApiKeyCreated": API_KEY_CREATED,
    "ApiKeyList": API_KEY_LIST, "Health": HEALTH,
}
