-- TaskForge schema, version 1: accounts, tasks, the transactional outbox, dead letters.
CREATE EXTENSION IF NOT EXISTS pgcrypto;

CREATE TABLE users (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email         text NOT NULL,
    password_hash text NOT NULL,
    is_admin      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

-- Refresh tokens rotate inside a family; presenting a spent token revokes the family.
CREATE TABLE refresh_families (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE TABLE refresh_tokens (
    token_hash text PRIMARY KEY,             -- sha256 of the token, never the token
    family_id  uuid NOT NULL REFERENCES refresh_families (id) ON DELETE CASCADE,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    spent_at   timestamptz
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);

-- Access tokens revoked by logout, kept until they would have expired anyway.
CREATE TABLE revoked_access_tokens (
    jti        text PRIMARY KEY,
    expires_at timestamptz NOT NULL
);

CREATE TABLE api_keys (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         text NOT NULL,
    prefix       text NOT NULL,             -- first characters, shown in listings
    key_hash     text NOT NULL UNIQUE,      -- sha256 of the whole key
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_keys_user ON api_keys (user_id, created_at DESC);

CREATE TABLE uploads (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    storage_key  text NOT NULL,
    size         bigint NOT NULL,
    content_type text NOT NULL,
    sha256       text NOT NULL,
    filename     text,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX uploads_user ON uploads (user_id, created_at DESC);

CREATE TYPE task_status AS ENUM
    ('pending', 'queued', 'running', 'retrying', 'succeeded', 'failed', 'cancelled');

CREATE TABLE tasks (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id          uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    type             text NOT NULL,
    status           task_status NOT NULL DEFAULT 'pending',
    progress         smallint NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    attempts         integer NOT NULL DEFAULT 0,
    payload          jsonb NOT NULL,
    result           jsonb,
    error            jsonb,
    idempotency_key  text,
    request_hash     text,                  -- sha256 of the canonical request, for Idempotency-Key
    trace_id         text,
    cancel_requested boolean NOT NULL DEFAULT false,
    lease_owner      text,
    lease_until      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz
);
CREATE UNIQUE INDEX tasks_idempotency ON tasks (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX tasks_user_newest ON tasks (user_id, created_at DESC, id DESC);
CREATE INDEX tasks_user_status_newest ON tasks (user_id, status, created_at DESC, id DESC);
CREATE INDEX tasks_active ON tasks (status, updated_at) WHERE status IN ('pending', 'queued', 'running', 'retrying');

-- Transactional outbox: one row per CloudEvent to publish. Never read with a cursor:
-- ids are assigned before commit, so rows commit out of order (claim with SKIP LOCKED).
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    event_id      uuid NOT NULL UNIQUE,
    type          text NOT NULL,
    headers       jsonb NOT NULL,           -- CloudEvent attributes and extensions
    payload       jsonb NOT NULL,           -- CloudEvent data
    created_at    timestamptz NOT NULL DEFAULT now(),
    dispatched_at timestamptz,
    attempts      integer NOT NULL DEFAULT 0,
    last_error    text,
    parked_at     timestamptz               -- unroutable or poisoned: needs an operator
);
CREATE INDEX outbox_pending ON outbox (id) WHERE dispatched_at IS NULL AND parked_at IS NULL;
CREATE INDEX outbox_dispatched ON outbox (dispatched_at) WHERE dispatched_at IS NOT NULL;

CREATE TABLE dead_letters (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    event_id     text NOT NULL,
    event_type   text NOT NULL,
    source       text NOT NULL,
    subject      text,
    task_id      uuid,
    attributes   jsonb NOT NULL,
    data         jsonb,
    error_dest   text,
    error_code   text,
    error_data   text,
    received_at  timestamptz NOT NULL DEFAULT now(),
    replayed_at  timestamptz,
    replay_count integer NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX dead_letters_event ON dead_letters (source, event_id, received_at);
CREATE INDEX dead_letters_newest ON dead_letters (received_at DESC);
