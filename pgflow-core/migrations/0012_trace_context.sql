-- =====================================================================================
-- pgflow engine, migration 0012: Trace context stored with runs (issue 23).
-- =====================================================================================
--
-- No pgflow version has this; the names follow the engine's style and everything is
-- additive (docs/sql-api.md, "Trace context").
--
-- WHAT IS STORED
-- --------------
-- pgflow_ext.run_trace_context holds, for a run started inside a traced request, the
-- W3C trace context of the code that started it: `traceparent` (version, trace id, the
-- starting span's id, flags) and `tracestate` (vendor data). A worker that starts a task
-- of the run makes the task's span a child of that context, so the tasks of a run appear
-- in the starter's trace even when another process runs them. A run started outside any
-- trace has no row. The row goes with its run (ON DELETE CASCADE): prune_runs, a flow
-- replaced with its runs, or a plain DELETE of the run take it along.
--
-- WRITING IT
-- ----------
-- set_run_trace_context stores a run's context once (the first writer wins: a context is
-- that of the code that started the run). The Rust client calls it in the statement that
-- starts the run, so the context commits with the run and a worker can never start a task
-- before the context is there. Other clients call it in the transaction that starts the
-- run. Whoever may call start_flow may call it (granted below, as 0009 did for
-- start_flow_at); it runs as the owner, so applications need no write privilege.
--
-- READING IT
-- ----------
-- started_task_telemetry gives a worker, for a batch of tasks it has just started, their
-- runs' trace contexts and how long each first attempt waited in the queue: one call per
-- batch. It answers only for tasks that the calling worker row started, of a flow the
-- calling role serves (as the worker protocol's functions check).
--
-- HOSTILE INPUT
-- -------------
-- The CHECK constraints hold each column to the W3C format (lowercase hex, the all-zero
-- ids and version ff refused, a bounded tracestate of printable ASCII), so that a worker
-- reading a row never meets anything but a well-formed header. Workers parse it with the
-- OpenTelemetry propagator all the same, which ignores what it cannot read.
-- =====================================================================================

CREATE TABLE pgflow_ext.run_trace_context (
  run_id      uuid        NOT NULL,
  traceparent text        NOT NULL,
  tracestate  text,
  created_at  timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT run_trace_context_pkey PRIMARY KEY (run_id),
  CONSTRAINT run_trace_context_run_id_fkey FOREIGN KEY (run_id)
    REFERENCES pgflow.runs (run_id) ON DELETE CASCADE,
  -- version-traceid-parentid-flags, as https://www.w3.org/TR/trace-context/ writes it.
  CONSTRAINT traceparent_is_valid CHECK (
    traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
    AND left(traceparent, 2) <> 'ff'
    AND substr(traceparent, 4, 32) <> repeat('0', 32)
    AND substr(traceparent, 37, 16) <> repeat('0', 16)),
  -- At most 32 list members of at most 256 + 1 + 256 characters: 8192 is plenty for what
  -- tracers propagate (the recommendation is 512).
  CONSTRAINT tracestate_is_valid CHECK (
    tracestate IS NULL OR (length(tracestate) <= 8192 AND tracestate ~ '^[\x20-\x7e]*$'))
);

REVOKE ALL ON TABLE pgflow_ext.run_trace_context FROM public;

-- Stores the trace context of run p_run_id unless it has one; true when this call stored
-- it, false when the run had one already or does not exist. A malformed context is
-- refused with the CHECK constraint's error (SQLSTATE 23514), the run untouched.
CREATE FUNCTION pgflow.set_run_trace_context(
  p_run_id uuid, p_traceparent text, p_tracestate text DEFAULT NULL
)
RETURNS boolean
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
  WITH stored AS (
    INSERT INTO pgflow_ext.run_trace_context (run_id, traceparent, tracestate)
    SELECT r.run_id, p_traceparent, nullif(p_tracestate, '')
      FROM pgflow.runs r
     WHERE r.run_id = p_run_id
    ON CONFLICT (run_id) DO NOTHING
    RETURNING 1
  )
  SELECT EXISTS (SELECT 1 FROM stored)
$$;

-- For the tasks (p_run_ids[i], p_step_slugs[i], p_task_indexes[i]) of flow p_flow_slug
-- that worker p_worker_id has started, by position i (1-based): their run's trace context,
-- and how long the first attempt waited in the queue, in seconds (NULL for a later attempt
-- or a run that was retried, whose queued_at predates the earlier attempts). The wait
-- starts when the task could first be read: its queued_at plus its step's start_delay, or
-- the run's scheduled_for when later.
CREATE FUNCTION pgflow.started_task_telemetry(
  p_flow_slug text, p_worker_id uuid,
  p_run_ids uuid[], p_step_slugs text[], p_task_indexes integer[]
)
RETURNS TABLE (ord bigint, traceparent text, tracestate text, queue_wait double precision)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = ''
ROWS 10
AS $$
BEGIN
  PERFORM pgflow._authorize_worker(p_flow_slug, p_worker_id);
  RETURN QUERY
  SELECT b.ord,
         c.traceparent,
         c.tracestate,
         CASE WHEN t.attempts_count = 1 AND r.retry_count = 0 AND t.started_at IS NOT NULL THEN
           greatest(0, extract(epoch FROM t.started_at - greatest(
             t.queued_at + make_interval(secs => coalesce(s.opt_start_delay, 0)),
             r.scheduled_for)))::double precision
         END
    FROM unnest(p_run_ids, p_step_slugs, p_task_indexes)
         WITH ORDINALITY AS b(run_id, step_slug, task_index, ord)
    JOIN pgflow.step_tasks t
      ON t.run_id = b.run_id AND t.step_slug = b.step_slug AND t.task_index = b.task_index
    JOIN pgflow.runs r ON r.run_id = t.run_id
    JOIN pgflow.steps s ON s.flow_slug = t.flow_slug AND s.step_slug = t.step_slug
    LEFT JOIN pgflow_ext.run_trace_context c ON c.run_id = t.run_id
   WHERE t.flow_slug = p_flow_slug
     AND t.last_worker_id = p_worker_id;
END;
$$;

-- -------------------------------------------------------------------------------------
-- Privileges: the owner's until granted (docs/security.md)
-- -------------------------------------------------------------------------------------

REVOKE EXECUTE ON FUNCTION
  pgflow.set_run_trace_context(uuid, text, text),
  pgflow.started_task_telemetry(text, uuid, uuid[], text[], integer[])
  FROM public;

-- Whoever may start runs may store their trace context, and whoever may read tasks may read
-- the telemetry of the tasks it started: deployments granted before this migration keep
-- working when they turn tracing on.
DO $$
DECLARE
  v_grant record;
BEGIN
  FOR v_grant IN
    SELECT DISTINCT pg_catalog.pg_get_userbyid(a.grantee) AS grantee,
           CASE p.oid
             WHEN 'pgflow.start_flow(text, jsonb, uuid)'::regprocedure
               THEN 'pgflow.set_run_trace_context(uuid, text, text)'
             ELSE 'pgflow.started_task_telemetry(text, uuid, uuid[], text[], integer[])'
           END AS function
      FROM pg_catalog.pg_proc p
     CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) a
     WHERE p.oid IN ('pgflow.start_flow(text, jsonb, uuid)'::regprocedure,
                     'pgflow._read_and_start(text, integer, integer, uuid)'::regprocedure)
       AND a.privilege_type = 'EXECUTE'
       AND a.grantee <> 0
       AND a.grantee <> p.proowner
  LOOP
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', v_grant.function, v_grant.grantee);
  END LOOP;
END;
$$;
