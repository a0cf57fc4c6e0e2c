-- Status fan-out bookkeeping (shared/tasks/state.py, shared/tasks/status.py).
--
-- Every state change bumps status_version in the same UPDATE that changes the task.
-- After the change is appended to the user's Redis stream, published_version catches up.
-- A row with published_version < status_version was committed but never reached Redis
-- (Redis down, or the process died between commit and publish): shared/tasks/status.py
-- replays such rows later, reading their current state, so the stream catches up.
--
-- Existing rows count as published (version 1 = 1); new rows start unpublished, so a
-- freshly submitted task reaches the stream even if its creator never publishes it.
ALTER TABLE tasks
    ADD COLUMN status_version    bigint NOT NULL DEFAULT 1,
    ADD COLUMN published_version bigint NOT NULL DEFAULT 1;
ALTER TABLE tasks ALTER COLUMN published_version SET DEFAULT 0;

-- Tiny in steady state: only rows whose latest change has not reached Redis yet.
CREATE INDEX tasks_unpublished ON tasks (updated_at) WHERE published_version < status_version;

-- The reaper looks for running tasks whose worker stopped renewing its lease.
CREATE INDEX tasks_running_lease ON tasks (lease_until) WHERE status = 'running';
