-- Completion webhooks (shared/webhooks/): endpoints, messages, attempts, dead letters.
--
-- A signing secret must be readable to sign with it, so it cannot be hashed like an API
-- key: it is stored encrypted (AES-256-GCM under TASKFORGE_WEBHOOK_ENCRYPTION_KEY, see
-- shared/webhooks/secrets.py). During a rotation the previous secret keeps signing
-- until previous_secret_expires_at.
CREATE TABLE webhook_endpoints (
    id                         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id                    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- 'endpoint': registered with POST /webhooks; 'callback': the account's signer for
    -- one-off callback_url deliveries (no URL of its own, at most one per user).
    kind                       text NOT NULL DEFAULT 'endpoint' CHECK (kind IN ('endpoint', 'callback')),
    url                        text,
    events                     text[] NOT NULL DEFAULT '{}',
    secret_enc                 bytea NOT NULL,
    previous_secret_enc        bytea,
    previous_secret_expires_at timestamptz,
    created_at                 timestamptz NOT NULL DEFAULT now(),
    rotated_at                 timestamptz,
    CHECK ((kind = 'endpoint') = (url IS NOT NULL))
);
CREATE INDEX webhook_endpoints_user ON webhook_endpoints (user_id, created_at);
CREATE UNIQUE INDEX webhook_endpoints_one_callback ON webhook_endpoints (user_id) WHERE kind = 'callback';

-- The one-off callback URL a task named at submit.
CREATE TABLE task_callbacks (
    task_id    uuid PRIMARY KEY REFERENCES tasks (id) ON DELETE CASCADE,
    url        text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One logical delivery of one event to one endpoint. The unique (endpoint_id, event_id)
-- makes a redelivered broker event a no-op; the body is stored so every retry sends (and
-- signs) the same bytes under the same webhook-id. Retries are scheduled by
-- next_attempt_at and picked up by the delivery function's tick; lease_until keeps two
-- deliverers from sending the same message at once.
CREATE TABLE webhook_messages (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    endpoint_id       uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    user_id           uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    event_id          text NOT NULL,
    event_type        text NOT NULL,
    url               text NOT NULL,
    body              text NOT NULL,
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'succeeded', 'failed', 'dead')),
    attempts          integer NOT NULL DEFAULT 0,
    window_started_at timestamptz NOT NULL DEFAULT now(),
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    lease_until       timestamptz,
    last_status_code  integer,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    UNIQUE (endpoint_id, event_id)
);
CREATE INDEX webhook_messages_due ON webhook_messages (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_messages_endpoint ON webhook_messages (endpoint_id, created_at DESC);

-- Every HTTP attempt of a message (what GET /webhooks/{id}/deliveries shows).
CREATE TABLE webhook_attempts (
    id           bigserial PRIMARY KEY,
    message_id   uuid NOT NULL REFERENCES webhook_messages (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    duration_ms  integer NOT NULL,
    status_code  integer,
    error        text,
    outcome      text NOT NULL CHECK (outcome IN ('succeeded', 'retry', 'failed', 'dead'))
);
CREATE INDEX webhook_attempts_message ON webhook_attempts (message_id, attempt);

-- Messages whose retry window ran out; the owner sees them and can redeliver.
CREATE TABLE webhook_dead_letters (
    message_id      uuid PRIMARY KEY REFERENCES webhook_messages (id) ON DELETE CASCADE,
    endpoint_id     uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    reason          text NOT NULL,
    dead_at         timestamptz NOT NULL DEFAULT now(),
    redelivered_at  timestamptz,
    redeliver_count integer NOT NULL DEFAULT 0
);
CREATE INDEX webhook_dead_letters_endpoint ON webhook_dead_letters (endpoint_id, dead_at DESC);

