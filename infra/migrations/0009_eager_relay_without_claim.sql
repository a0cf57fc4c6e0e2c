-- The gateway's eager relay publishes the event of a task it just submitted straight
-- from memory, without claiming and reading back the outbox row (shared/outbox/relay.py):
--
-- * outbox.relay_until: until then the row is the relay's; the sweeper claims only rows
--   without it or past it, so the two rarely publish the same row (a duplicate stays
--   harmless: receivers dedupe on source + id).
-- * taskforge_submit_task (0008) takes p_relay_window_s (NULL: no eager relay, no
--   reservation) and also returns the requested event's data exactly as the outbox row
--   stores it (PostgreSQL's text of the jsonb, the bytes every publisher sends), in a
--   new column event_data set for outcome 'created'. The signature and return type
--   change, hence DROP and CREATE; the body is 0008's otherwise.
ALTER TABLE outbox ADD COLUMN relay_until timestamptz;

DROP FUNCTION taskforge_submit_task(uuid, text, text, uuid, uuid, uuid[], uuid, text, jsonb, text, text,
                                    text, text, uuid, text, jsonb, integer, integer);
CREATE FUNCTION taskforge_submit_task(
    p_user_id uuid, p_via text, p_jti text, p_family uuid, p_api_key uuid,
    p_uploads uuid[], p_task_id uuid, p_type text, p_payload jsonb, p_key text, p_request_hash text,
    p_trace_id text, p_callback_url text, p_event_id uuid, p_event_type text, p_headers jsonb,
    p_max_event_bytes integer, p_cap integer, p_relay_window_s double precision)
RETURNS TABLE (outcome text, task jsonb, found_uploads uuid[], event_data text)
LANGUAGE plpgsql AS $$
DECLARE
    t tasks;
    present uuid[];
    body text;
    size integer;
    active integer;
BEGIN
    IF p_via = 'apikey' THEN
        PERFORM 1 FROM api_keys k WHERE k.id = p_api_key AND k.user_id = p_user_id AND k.revoked_at IS NULL;
    ELSE
        PERFORM 1 FROM users u WHERE u.id = p_user_id
            AND NOT EXISTS (SELECT 1 FROM revoked_access_tokens r WHERE r.jti = p_jti)
            AND NOT EXISTS (SELECT 1 FROM refresh_families f WHERE f.id = p_family AND f.revoked_at IS NOT NULL);
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'token revoked' USING ERRCODE = 'TF401';
    END IF;

    IF cardinality(p_uploads) > 0 THEN
        SELECT coalesce(array_agg(up.id), '{}') INTO present
            FROM uploads up WHERE up.user_id = p_user_id AND up.id = ANY (p_uploads);
        IF cardinality(present) < cardinality(p_uploads) THEN
            RETURN QUERY SELECT 'missing_uploads'::text, NULL::jsonb, present, NULL::text;
            RETURN;
        END IF;
    END IF;

    IF p_key IS NOT NULL THEN
        SELECT * INTO t FROM tasks x WHERE x.user_id = p_user_id AND x.idempotency_key = p_key;
        IF FOUND THEN
            RETURN QUERY SELECT 'replay'::text, to_jsonb(t), NULL::uuid[], NULL::text;
            RETURN;
        END IF;
    END IF;

    INSERT INTO tasks (id, user_id, type, payload, idempotency_key, request_hash, trace_id)
        VALUES (p_task_id, p_user_id, p_type, p_payload, p_key, p_request_hash, p_trace_id)
        ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING * INTO t;
    IF NOT FOUND THEN  -- lost an idempotency race: the winner is committed now
        SELECT * INTO t FROM tasks x WHERE x.user_id = p_user_id AND x.idempotency_key = p_key;
        RETURN QUERY SELECT 'replay'::text, to_jsonb(t), NULL::uuid[], NULL::text;
        RETURN;
    END IF;

    IF p_callback_url IS NOT NULL THEN
        INSERT INTO task_callbacks (task_id, url) VALUES (t.id, p_callback_url) ON CONFLICT (task_id) DO NOTHING;
    END IF;

    INSERT INTO outbox (event_id, type, headers, payload, relay_until)
        VALUES (p_event_id, p_event_type, p_headers,
                jsonb_build_object('task_id', t.id::text, 'user_id', t.user_id::text, 'type', t.type,
                                   'payload', t.payload),
                now() + make_interval(secs => p_relay_window_s))
        RETURNING outbox.payload::text INTO body;
    size := octet_length(body);
    IF p_max_event_bytes IS NOT NULL AND size > p_max_event_bytes THEN
        RAISE EXCEPTION 'event too large' USING ERRCODE = 'TF413', DETAIL = size::text;
    END IF;

    IF p_cap > 0 THEN
        -- Counted after the insert under a per-user lock held to the commit, exactly as
        -- shared.ratelimit.check_in_flight does: concurrent submissions count in turn.
        PERFORM pg_advisory_xact_lock(x'7A5F0002'::int, hashtext(p_user_id::text));
        SELECT count(*) INTO active FROM (SELECT 1 FROM tasks x WHERE x.user_id = p_user_id
            AND x.status IN ('pending', 'queued', 'running', 'retrying') LIMIT p_cap + 1) s;
        IF active > p_cap THEN
            RAISE EXCEPTION 'too many tasks in flight' USING ERRCODE = 'TF429', DETAIL = active::text;
        END IF;
    END IF;

    RETURN QUERY SELECT 'created'::text, to_jsonb(t), NULL::uuid[], body;
END;
$$;
