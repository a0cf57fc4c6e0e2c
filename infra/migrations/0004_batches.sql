-- Batches: a manifest of many tasks, released to the broker a few at a time.
--
-- A batch's lines live in batch_items from the moment it is accepted (one COPY). An item
-- becomes a task only when the fair releaser (shared/batches/release.py) hands it a slot:
-- the task row (with the id reserved in batch_items.task_id) and its outbox row are
-- written in the same transaction that marks the item 'released', so a crash either
-- releases an item exactly once or not at all.
--
-- Progress costs one row read at any size: batches carries a counter per task status,
-- kept by a trigger on tasks in the same transaction as every status change (whatever
-- code makes it), plus n_waiting (items not released yet), kept by the release, cancel
-- and retry code under the batch row's lock.
CREATE TYPE batch_status AS ENUM ('running', 'completed', 'cancelled');

-- Order of service for round-robin release: a batch (and its user) served longer ago goes first.
CREATE SEQUENCE batch_service_seq;

CREATE TABLE batches (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id          uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    status           batch_status NOT NULL DEFAULT 'running',
    total            integer NOT NULL CHECK (total > 0),
    max_in_flight    integer NOT NULL CHECK (max_in_flight > 0),
    idempotency_key  text,
    request_hash     text NOT NULL,          -- sha256 of the manifest and options
    n_waiting        integer NOT NULL DEFAULT 0,
    n_pending        integer NOT NULL DEFAULT 0,
    n_queued         integer NOT NULL DEFAULT 0,
    n_running        integer NOT NULL DEFAULT 0,
    n_retrying       integer NOT NULL DEFAULT 0,
    n_succeeded      integer NOT NULL DEFAULT 0,
    n_failed         integer NOT NULL DEFAULT 0,
    n_cancelled      integer NOT NULL DEFAULT 0,
    n_released       integer NOT NULL DEFAULT 0,   -- tasks created so far (retries included)
    retries          integer NOT NULL DEFAULT 0,   -- POST /batches/{id}/retry calls that re-ran items
    function_ms      bigint NOT NULL DEFAULT 0,    -- sum over finished tasks of finished_at - started_at
    cold_starts      integer NOT NULL DEFAULT 0,   -- worker processes whose first delivery was one of its tasks
    last_served      bigint NOT NULL DEFAULT 0,    -- batch_service_seq value of its latest release
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    CHECK (n_waiting >= 0 AND n_pending >= 0 AND n_queued >= 0 AND n_running >= 0
           AND n_retrying >= 0 AND n_succeeded >= 0 AND n_failed >= 0 AND n_cancelled >= 0)
);
CREATE UNIQUE INDEX batches_idempotency ON batches (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX batches_user_newest ON batches (user_id, created_at DESC, id DESC);
-- Small in steady state: batches that still have work waiting or in flight.
CREATE INDEX batches_live ON batches (last_served)
    WHERE status = 'running' OR n_pending + n_queued + n_running + n_retrying > 0;

CREATE TABLE batch_items (
    batch_id  uuid NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    line      integer NOT NULL,              -- 1-based line number in the manifest
    ref       text,                          -- the client's own reference, if given
    task_id   uuid NOT NULL,                 -- reserved at acceptance; a retry reserves a new one
    type      text NOT NULL,
    payload   jsonb NOT NULL,
    state     text NOT NULL DEFAULT 'waiting' CHECK (state IN ('waiting', 'released', 'cancelled')),
    attempts  integer NOT NULL DEFAULT 0,    -- tasks created for this line (retries add one)
    PRIMARY KEY (batch_id, line)
);
CREATE INDEX batch_items_waiting ON batch_items (batch_id, line) WHERE state = 'waiting';

ALTER TABLE tasks ADD COLUMN batch_id uuid REFERENCES batches (id) ON DELETE SET NULL;
CREATE INDEX tasks_batch_status ON tasks (batch_id, status) WHERE batch_id IS NOT NULL;

-- Apply one task's move between statuses (either side may be NULL: entering or leaving
-- the batch) to its batch's counters, and complete the batch when nothing is left to run.
CREATE FUNCTION batch_count(p_batch uuid, p_plus task_status, p_minus task_status, p_ms bigint)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    b batches%ROWTYPE;
BEGIN
    UPDATE batches SET
        n_pending   = n_pending   + (p_plus IS NOT DISTINCT FROM 'pending')::int   - (p_minus IS NOT DISTINCT FROM 'pending')::int,
        n_queued    = n_queued    + (p_plus IS NOT DISTINCT FROM 'queued')::int    - (p_minus IS NOT DISTINCT FROM 'queued')::int,
        n_running   = n_running   + (p_plus IS NOT DISTINCT FROM 'running')::int   - (p_minus IS NOT DISTINCT FROM 'running')::int,
        n_retrying  = n_retrying  + (p_plus IS NOT DISTINCT FROM 'retrying')::int  - (p_minus IS NOT DISTINCT FROM 'retrying')::int,
        n_succeeded = n_succeeded + (p_plus IS NOT DISTINCT FROM 'succeeded')::int - (p_minus IS NOT DISTINCT FROM 'succeeded')::int,
        n_failed    = n_failed    + (p_plus IS NOT DISTINCT FROM 'failed')::int    - (p_minus IS NOT DISTINCT FROM 'failed')::int,
        n_cancelled = n_cancelled + (p_plus IS NOT DISTINCT FROM 'cancelled')::int - (p_minus IS NOT DISTINCT FROM 'cancelled')::int,
        function_ms = function_ms + coalesce(p_ms, 0),
        updated_at  = now()
    WHERE id = p_batch
    RETURNING * INTO b;
    IF FOUND AND b.status = 'running' AND b.n_waiting = 0
       AND b.n_succeeded + b.n_failed + b.n_cancelled >= b.total THEN
        UPDATE batches SET status = 'completed', finished_at = now() WHERE id = p_batch;
    END IF;
END $$;

CREATE FUNCTION batch_count_task() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ms bigint := NULL;
BEGIN
    IF NEW.batch_id IS NOT NULL AND NEW.status IN ('succeeded', 'failed', 'cancelled')
       AND (TG_OP = 'INSERT' OR OLD.status NOT IN ('succeeded', 'failed', 'cancelled'))
       AND NEW.started_at IS NOT NULL THEN
        ms := greatest(0, (extract(epoch FROM coalesce(NEW.finished_at, now()) - NEW.started_at) * 1000)::bigint);
    END IF;
    IF TG_OP = 'INSERT' THEN
        PERFORM batch_count(NEW.batch_id, NEW.status, NULL, ms);
    ELSIF OLD.batch_id IS NOT DISTINCT FROM NEW.batch_id THEN
        PERFORM batch_count(NEW.batch_id, NEW.status, OLD.status, ms);
    ELSE
        IF OLD.batch_id IS NOT NULL THEN
            PERFORM batch_count(OLD.batch_id, NULL, OLD.status, NULL);
        END IF;
        IF NEW.batch_id IS NOT NULL THEN
            PERFORM batch_count(NEW.batch_id, NEW.status, NULL, ms);
        END IF;
    END IF;
    RETURN NULL;
END $$;

-- WHEN clauses keep the cost at zero for tasks outside batches and for changes that do
-- not move a task between statuses (progress, lease renewals).
CREATE TRIGGER tasks_batch_count_insert AFTER INSERT ON tasks
    FOR EACH ROW WHEN (NEW.batch_id IS NOT NULL) EXECUTE FUNCTION batch_count_task();
CREATE TRIGGER tasks_batch_count_update AFTER UPDATE OF status, batch_id ON tasks
    FOR EACH ROW WHEN ((OLD.batch_id IS NOT NULL OR NEW.batch_id IS NOT NULL)
                       AND (OLD.status IS DISTINCT FROM NEW.status OR OLD.batch_id IS DISTINCT FROM NEW.batch_id))
    EXECUTE FUNCTION batch_count_task();
