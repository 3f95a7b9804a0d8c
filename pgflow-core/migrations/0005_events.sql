-- =====================================================================================
-- pgflow engine, migration 0005: events as pgflow 0.8.1 sends them.
--
-- The TypeScript client and Supabase Realtime consumers read the events' payloads, so each
-- event carries every key that 0.8.1's carries, with the same value. Three places differed:
--
--   * run:started lacked `remaining_steps` (the run's step count as inserted).
--   * A type violation (a single step's output is not the array a dependent map needs)
--     sent step:failed then run:failed to realtime.send; 0.8.1 sends run:failed first
--     there (and step:failed then run:failed for a failed task, as before). Channel
--     `pgflow` (ours, not 0.8.1's) keeps run:failed after step:failed: listeners there
--     (RunHandle::events, `pgflow watch`) stop at the event that ends a run.
--   * set_vt_batch raised when msg_ids or vt_offsets was NULL; 0.8.1 returns no row.
--
-- The keys this engine adds beyond 0.8.1's (flow_slug on step events, and others) stay:
-- docs/sql-api.md lists them.
--
-- CREATE OR REPLACE keeps a function's owner and grants but sets its other attributes to
-- what the statement says: each function below restates every attribute it had before
-- (start_flow is SECURITY DEFINER since 0004).
-- =====================================================================================

-- 0001's start_flow with `remaining_steps` in run:started.
CREATE OR REPLACE FUNCTION pgflow.start_flow(flow_slug text, input jsonb, run_id uuid DEFAULT NULL)
RETURNS SETOF pgflow.runs
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_step_count    integer;
  v_roots         text[];
  v_has_root_map  boolean;
  v_root_tasks    integer;
  v_run           pgflow.runs;
  v_started       jsonb;
BEGIN
  SELECT count(*)::integer, coalesce(bool_or(s.step_type = 'map' AND s.deps_count = 0), false),
         array_agg(s.step_slug) FILTER (WHERE s.deps_count = 0)
    INTO v_step_count, v_has_root_map, v_roots
    FROM pgflow.steps s
   WHERE s.flow_slug = start_flow.flow_slug;

  IF v_has_root_map THEN
    IF start_flow.input IS NULL THEN
      RAISE EXCEPTION 'Flow % has root map steps but input is NULL', start_flow.flow_slug;
    END IF;
    IF jsonb_typeof(start_flow.input) <> 'array' THEN
      RAISE EXCEPTION 'Flow % has root map steps but input is not an array (got %)',
        start_flow.flow_slug, jsonb_typeof(start_flow.input);
    END IF;
    -- Computed here, not in the INSERT's CASE: the planner folds constant calls in
    -- every CASE branch and would take the length of a non-array input.
    v_root_tasks := jsonb_array_length(start_flow.input);
  END IF;

  INSERT INTO pgflow.runs (run_id, flow_slug, input, remaining_steps)
  VALUES (coalesce(start_flow.run_id, gen_random_uuid()), start_flow.flow_slug,
          start_flow.input, v_step_count)
  RETURNING * INTO v_run;

  -- Roots are inserted started, unless an empty root map sends the run through the
  -- cascade below: every root then has tasks (a single step one, a root map the input's
  -- length).
  INSERT INTO pgflow.step_states (flow_slug, run_id, step_slug, remaining_deps, initial_tasks,
                                  status, started_at, remaining_tasks)
  SELECT s.flow_slug, v_run.run_id, s.step_slug, s.deps_count, n.tasks,
         CASE WHEN n.starts THEN 'started' ELSE 'created' END,
         CASE WHEN n.starts THEN now() END,
         CASE WHEN n.starts THEN n.tasks END
    FROM pgflow.steps s
   CROSS JOIN LATERAL (
     SELECT CASE
              WHEN s.step_type = 'single' THEN 1
              WHEN s.deps_count = 0 THEN v_root_tasks
            END AS tasks,
            s.deps_count = 0 AND v_root_tasks IS DISTINCT FROM 0 AS starts
   ) n
   WHERE s.flow_slug = start_flow.flow_slug;

  -- remaining_steps as inserted: every step of the flow, before any empty map completes.
  v_started := jsonb_build_object(
    'event_type', 'run:started',
    'run_id', v_run.run_id,
    'flow_slug', v_run.flow_slug,
    'status', 'started',
    'started_at', v_run.started_at,
    'remaining_steps', v_run.remaining_steps,
    'input', v_run.input
  );

  -- Only an empty root map makes a taskless step at start (a dependent map learns its
  -- count later): then the full path with its cascade, else start the roots directly,
  -- with run:started in the same call as their step:started events.
  -- Nobody else sees the new run yet, so its row needs no lock here.
  IF v_root_tasks = 0 THEN
    PERFORM pgflow._emit(v_started);
    PERFORM pgflow.start_ready_steps(v_run.run_id);
  ELSIF v_roots IS NOT NULL THEN
    PERFORM pgflow._start_ready_steps(
      v_run.flow_slug, array_fill(v_run.run_id, ARRAY[cardinality(v_roots)]), v_roots, true,
      ARRAY[v_started]);
  ELSE
    PERFORM pgflow._emit(v_started);
  END IF;
  IF v_root_tasks = 0 OR v_step_count = 0 THEN
    PERFORM pgflow.maybe_complete_run(v_run.run_id);
    RETURN QUERY SELECT * FROM pgflow.runs r WHERE r.run_id = v_run.run_id;
    RETURN;
  END IF;

  -- Starting root steps leaves the run's row as inserted.
  RETURN NEXT v_run;
END;
$$;

-- 0001's _emit_all, except on channel `pgflow`: there an event that ends a run
-- (run:completed, run:failed) leaves after the other events of the same call, so that it
-- stays the last event of its run whatever order the caller gives. realtime.send gets the
-- events in array order, as before: for a type violation, 0.8.1's run:failed first.
CREATE OR REPLACE FUNCTION pgflow._emit_all(events jsonb[])
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
BEGIN
  IF coalesce(cardinality(events), 0) = 0 THEN
    RETURN;
  END IF;

  PERFORM pg_notify('pgflow', (
            CASE
              WHEN jsonb_typeof(e.event -> 'error_message') = 'string'
                THEN jsonb_set(e.event - 'output' - 'input', '{error_message}',
                               to_jsonb(left(e.event ->> 'error_message', 1000)))
              ELSE e.event - 'output' - 'input'
            END)::text)
     FROM unnest(events) WITH ORDINALITY AS e(event, ord)
    ORDER BY e.event ->> 'event_type' IN ('run:completed', 'run:failed'), e.ord;

  IF pgflow._has_realtime() THEN
    PERFORM realtime.send(
              e.event,
              CASE
                WHEN e.event ->> 'event_type' LIKE 'step:%'
                  THEN 'step:' || (e.event ->> 'step_slug') || ':'
                       || split_part(e.event ->> 'event_type', ':', 2)
                ELSE e.event ->> 'event_type'
              END,
              'pgflow:run:' || (e.event ->> 'run_id'),
              false)
       FROM unnest(events) WITH ORDINALITY AS e(event, ord)
      ORDER BY e.ord;
  END IF;
END;
$$;

-- 0001's _fail_run, emitting in 0.8.1's order: run:failed then step:failed when the step
-- fails for a type violation, step:failed then run:failed otherwise (_emit_all keeps
-- run:failed last on channel `pgflow` in both cases).
--
-- Which one it is, the failed task tells: its two callers leave it failed before calling.
-- fail_task records the step's message on the task; complete_tasks records the task's own
-- ("[TYPE_VIOLATION] Produced <type> instead of array", on the single step's only task,
-- index 0) and passes the step's ("[TYPE_VIOLATION] Map step ..."). So a step message with
-- the type-violation prefix whose task 0 failed with another message is a type violation,
-- and a handler's error that happens to start with that prefix is not: fail_task gave its
-- task the same message. Task 0 of a map step that fails through fail_task cannot have
-- failed before: its failure would have failed the run already.
CREATE OR REPLACE FUNCTION pgflow._fail_run(
  p_run_id        uuid,
  p_flow_slug     text,
  p_step_slug     text,
  p_error_message text
)
RETURNS bigint[]
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
DECLARE
  v_step_failed jsonb;
  v_run_failed  jsonb;
BEGIN
  UPDATE pgflow.step_states ss
     SET status = 'failed',
         failed_at = now(),
         error_message = p_error_message
   WHERE ss.run_id = p_run_id
     AND ss.step_slug = p_step_slug;

  UPDATE pgflow.runs r
     SET status = 'failed',
         failed_at = now()
   WHERE r.run_id = p_run_id;

  v_step_failed := jsonb_build_object(
    'event_type', 'step:failed',
    'run_id', p_run_id,
    'flow_slug', p_flow_slug,
    'step_slug', p_step_slug,
    'status', 'failed',
    'error_message', p_error_message,
    'failed_at', now()
  );
  v_run_failed := jsonb_build_object(
    'event_type', 'run:failed',
    'run_id', p_run_id,
    'flow_slug', p_flow_slug,
    'status', 'failed',
    'error_message', p_error_message,
    'failed_at', now()
  );

  IF p_error_message LIKE '[TYPE\_VIOLATION] %' AND EXISTS (
       SELECT 1
         FROM pgflow.step_tasks t
        WHERE t.run_id = p_run_id
          AND t.step_slug = p_step_slug
          AND t.task_index = 0
          AND t.status = 'failed'
          AND t.error_message IS DISTINCT FROM p_error_message) THEN
    PERFORM pgflow._emit_all(ARRAY[v_run_failed, v_step_failed]);
  ELSE
    PERFORM pgflow._emit_all(ARRAY[v_step_failed, v_run_failed]);
  END IF;

  RETURN ARRAY(
    SELECT t.message_id
      FROM pgflow.step_tasks t
     WHERE t.run_id = p_run_id
       AND t.status IN ('queued', 'started')
       AND t.message_id IS NOT NULL
  );
END;
$$;

-- 0001's set_vt_batch, returning no row when msg_ids or vt_offsets is NULL, as 0.8.1's.
CREATE OR REPLACE FUNCTION pgflow.set_vt_batch(queue_name text, msg_ids bigint[], vt_offsets integer[])
RETURNS TABLE (
  msg_id      bigint,
  read_ct     integer,
  enqueued_at timestamptz,
  vt          timestamptz,
  message     jsonb,
  headers     jsonb
)
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
BEGIN
  IF set_vt_batch.msg_ids IS NULL OR set_vt_batch.vt_offsets IS NULL THEN
    RETURN;
  END IF;
  IF cardinality(set_vt_batch.msg_ids) <> cardinality(set_vt_batch.vt_offsets) THEN
    RAISE EXCEPTION 'msg_ids length (%) must equal vt_offsets length (%)',
      cardinality(set_vt_batch.msg_ids), cardinality(set_vt_batch.vt_offsets);
  END IF;
  IF cardinality(set_vt_batch.msg_ids) = 0 THEN
    RETURN;
  END IF;

  RETURN QUERY EXECUTE format(
    $q$
    WITH locked AS (
      SELECT q.msg_id FROM pgmq.%1$I q WHERE q.msg_id = ANY($1) ORDER BY q.msg_id FOR UPDATE
    )
    UPDATE pgmq.%1$I q
       SET vt = clock_timestamp() + make_interval(secs => o.vt_offset)
      FROM locked
      JOIN unnest($1, $2) AS o(msg_id, vt_offset) ON o.msg_id = locked.msg_id
     WHERE q.msg_id = locked.msg_id
    RETURNING q.msg_id, q.read_ct, q.enqueued_at, q.vt, q.message, q.headers
    $q$,
    pgmq.format_table_name(set_vt_batch.queue_name, 'q')
  ) USING set_vt_batch.msg_ids, set_vt_batch.vt_offsets;
END;
$$;
