-- The reaper's bookkeeping (shared/state.py reap_stale).
--
-- A pending, queued or retrying task that made no progress for the stale bound has lost
-- its event (refused by a worker, dead-lettered while the dead-letter function was down,
-- dropped by the broker). The reaper writes a fresh requested event and counts it here;
-- after the allowed number of rescues the task fails. rescue_reason says why the reaper
-- last acted, for operators and `taskforge doctor`.
ALTER TABLE tasks
    ADD COLUMN rescues       integer NOT NULL DEFAULT 0,
    ADD COLUMN rescue_reason text;

-- The reaper and the doctor look for unfinished tasks by their last change.
CREATE INDEX tasks_waiting_updated ON tasks (updated_at) WHERE status IN ('pending', 'queued', 'retrying');
