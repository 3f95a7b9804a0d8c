-- -------------------------------------------------------------------------------------
-- Run progression (internal, but callable by tooling)
-- -------------------------------------------------------------------------------------

CREATE FUNCTION pgflow.cascade_complete_taskless_steps(run_id uuid)
RETURNS integer
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
DECLARE
  v_flow_slug  text;
  v_status     text;
  v_total      integer := 0;
  v_iterations integer := 0;
  v_slugs      text[];
BEGIN
  SELECT r.flow_slug, r.status INTO v_flow_slug, v_status
    FROM pgflow.runs r
   WHERE r.run_id = cascade_complete_taskless_steps.run_id
     FOR NO KEY UPDATE;
  IF NOT FOUND OR v_status = 'failed' THEN
    RETURN 0;
  END IF;

  -- One wave per iteration: every empty step whose deps are all done completes, then
  -- its dependents are released; the next wave sees what that unblocked.
  LOOP
    v_iterations := v_iterations + 1;
    IF v_iterations > 50 THEN
      RAISE EXCEPTION 'Cascade loop exceeded safety limit of 50 iterations';
    END IF;

    WITH done AS (
      UPDATE pgflow.step_states ss
         SET status = 'completed',
             started_at = now(),
             completed_at = now(),
             remaining_tasks = 0
       WHERE ss.run_id = cascade_complete_taskless_steps.run_id
         AND ss.status = 'created'
         AND ss.remaining_deps = 0
         AND ss.initial_tasks = 0
      RETURNING ss.step_slug
    )
    SELECT array_agg(done.step_slug ORDER BY s.step_index)
      INTO v_slugs
      FROM done
      JOIN pgflow.steps s ON s.flow_slug = v_flow_slug AND s.step_slug = done.step_slug;

    EXIT WHEN v_slugs IS NULL;

    PERFORM pgflow._emit_all(ARRAY(
      SELECT jsonb_build_object(
               'event_type', 'step:completed',
               'run_id', cascade_complete_taskless_steps.run_id,
               'flow_slug', v_flow_slug,
               'step_slug', c.step_slug,
               'status', 'completed',
               'started_at', now(),
               'completed_at', now(),
               'remaining_tasks', 0,
               'remaining_deps', 0,
               'output', '[]'::jsonb)
        FROM unnest(v_slugs) WITH ORDINALITY AS c(step_slug, ord)
       ORDER BY c.ord));

    -- A map fed by an empty step has nothing to map over either.
    UPDATE pgflow.step_states child
       SET remaining_deps = child.remaining_deps - released.n,
           initial_tasks = CASE
             WHEN released.is_map AND child.initial_tasks IS NULL THEN 0
             ELSE child.initial_tasks
           END
      FROM (
        SELECT d.step_slug, count(*)::integer AS n, bool_and(cs.step_type = 'map') AS is_map
          FROM pgflow.deps d
          JOIN pgflow.steps cs ON cs.flow_slug = d.flow_slug AND cs.step_slug = d.step_slug
         WHERE d.flow_slug = v_flow_slug
           AND d.dep_slug = ANY(v_slugs)
         GROUP BY d.step_slug
      ) released
     WHERE child.run_id = cascade_complete_taskless_steps.run_id
       AND child.step_slug = released.step_slug;

    UPDATE pgflow.runs r
       SET remaining_steps = r.remaining_steps - cardinality(v_slugs)
     WHERE r.run_id = cascade_complete_taskless_steps.run_id;

    v_total := v_total + cardinality(v_slugs);
  END LOOP;

  RETURN v_total;
END;
$$;

-- Starts the given steps of runs of one flow that are ready (created, no deps left, tasks
-- to run), set-based across runs: one step:started event per step, in (run, step_index)
-- order, one insert that sends all their messages, and their task rows.
-- The caller holds the runs' row locks (or created them in this transaction) and knows
-- they have not failed. With p_started, the caller has already marked exactly these steps
-- started, in the statement that created or released them: one row version and one
-- statement fewer per started step than updating them again here. p_events go out first,
-- in the same call as the step:started events (start_flow's run:started).
CREATE FUNCTION pgflow._start_ready_steps(
  p_flow_slug text, p_run_ids uuid[], p_step_slugs text[], p_started boolean DEFAULT false,
  p_events jsonb[] DEFAULT '{}'
)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
DECLARE
  v_runs    uuid[];
  v_steps   text[];
  v_counts  integer[];
  v_delays  integer[];
  v_deps    integer[];
  v_started timestamptz[];
  v_now     timestamptz := clock_timestamp();
  -- one entry per task to send
  v_task_runs    uuid[];
  v_task_steps   text[];
  v_task_indexes integer[];
  v_vts          timestamptz[];
  v_messages     jsonb[];
  v_msg_ids      bigint[];
  v_send         text;
BEGIN
  IF p_started THEN
    SELECT array_agg(o.run_id), array_agg(o.step_slug), array_agg(o.initial_tasks),
           array_agg(o.start_delay), array_agg(o.remaining_deps), array_agg(o.started_at)
      INTO v_runs, v_steps, v_counts, v_delays, v_deps, v_started
      FROM (
        SELECT ss.run_id, ss.step_slug, ss.initial_tasks, ss.remaining_deps, ss.started_at,
               coalesce(s.opt_start_delay, 0) AS start_delay
          FROM unnest(p_run_ids, p_step_slugs) AS p(run_id, step_slug)
          JOIN pgflow.step_states ss ON ss.run_id = p.run_id AND ss.step_slug = p.step_slug
          JOIN pgflow.steps s ON s.flow_slug = p_flow_slug AND s.step_slug = p.step_slug
         ORDER BY ss.run_id, s.step_index
      ) o;
  ELSE
    WITH started AS (
      UPDATE pgflow.step_states ss
         SET status = 'started',
             started_at = now(),
             remaining_tasks = ss.initial_tasks
        FROM unnest(p_run_ids, p_step_slugs) AS p(run_id, step_slug)
       WHERE ss.run_id = p.run_id
         AND ss.step_slug = p.step_slug
         AND ss.status = 'created'
         AND ss.remaining_deps = 0
         AND ss.initial_tasks > 0
      RETURNING ss.run_id, ss.step_slug, ss.initial_tasks, ss.remaining_deps, ss.started_at
    ),
    ordered AS (
      SELECT started.*, coalesce(s.opt_start_delay, 0) AS start_delay
        FROM started
        JOIN pgflow.steps s ON s.flow_slug = p_flow_slug AND s.step_slug = started.step_slug
       ORDER BY started.run_id, s.step_index
    )
    SELECT array_agg(o.run_id), array_agg(o.step_slug), array_agg(o.initial_tasks),
           array_agg(o.start_delay), array_agg(o.remaining_deps), array_agg(o.started_at)
      INTO v_runs, v_steps, v_counts, v_delays, v_deps, v_started
      FROM ordered o;
  END IF;

  IF v_runs IS NULL THEN
    PERFORM pgflow._emit_all(p_events);
    RETURN;
  END IF;

  PERFORM pgflow._emit_all(p_events || ARRAY(
    SELECT jsonb_build_object(
             'event_type', 'step:started',
             'run_id', e.run_id,
             'flow_slug', p_flow_slug,
             'step_slug', e.step_slug,
             'status', 'started',
             'started_at', e.started_at,
             'remaining_tasks', e.n,
             'remaining_deps', e.deps)
      FROM unnest(v_runs, v_steps, v_counts, v_deps, v_started) WITH ORDINALITY
           AS e(run_id, step_slug, n, deps, started_at, ord)
     ORDER BY e.ord));

  -- The messages, one per task in (run, step, task_index) order, built by static SQL.
  SELECT array_agg(m.run_id), array_agg(m.step_slug), array_agg(m.task_index),
         array_agg(m.vt), array_agg(m.message)
    INTO v_task_runs, v_task_steps, v_task_indexes, v_vts, v_messages
    FROM (
      SELECT s.run_id, s.step_slug, i AS task_index,
             v_now + make_interval(secs => s.delay) AS vt,
             jsonb_build_object('flow_slug', p_flow_slug, 'run_id', s.run_id,
                                'step_slug', s.step_slug, 'task_index', i) AS message
        FROM unnest(v_runs, v_steps, v_counts, v_delays) WITH ORDINALITY
             AS s(run_id, step_slug, n, delay, ord)
       CROSS JOIN LATERAL generate_series(0, s.n - 1) AS i
       ORDER BY s.ord, i
    ) m;

  -- What pgmq.send_batch(queue, msgs, delay) inserts per step (vt = one clock_timestamp()
  -- + the step's delay, headers NULL), for every step at once and without pgmq's function
  -- layers: through the queue's send function (_create_queue_functions), whose plan is
  -- cached, else by the same statement (_send_statement) as dynamic SQL. The queue is the
  -- flow slug (is_valid_slug), so its table is pgmq.q_<lower(slug)>, as pgmq names it; a
  -- missing queue fails on that table (42P01) as pgmq would.
  v_send := pgflow._queue_function('send', p_flow_slug);
  IF v_send IS NOT NULL THEN
    EXECUTE format('SELECT pgflow.%I($1, $2)', v_send)
      INTO v_msg_ids
      USING v_vts, v_messages;
  ELSE
    EXECUTE pgflow._send_statement('q_' || lower(p_flow_slug))
      INTO v_msg_ids
      USING v_vts, v_messages;
  END IF;

  INSERT INTO pgflow.step_tasks (flow_slug, run_id, step_slug, task_index, message_id)
  SELECT p_flow_slug, t.run_id, t.step_slug, t.task_index, t.msg_id
    FROM unnest(v_task_runs, v_task_steps, v_task_indexes, v_msg_ids)
         AS t(run_id, step_slug, task_index, msg_id);

  -- Workers' wake-up (EXTENSION beyond pgflow 0.8.1): channel pgflow_tasks, payload the
  -- flow slug. PostgreSQL delivers a (channel, payload) pair once per transaction, so a
  -- worker's listener gets one notification per transaction that queues its flow's tasks
  -- instead of every event on channel pgflow.
  PERFORM pg_notify('pgflow_tasks', p_flow_slug);
END;
$$;

CREATE FUNCTION pgflow.start_ready_steps(run_id uuid)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
DECLARE
  v_flow_slug text;
  v_status    text;
  v_slugs     text[];
BEGIN
  SELECT r.flow_slug, r.status INTO v_flow_slug, v_status
    FROM pgflow.runs r
   WHERE r.run_id = start_ready_steps.run_id
     FOR NO KEY UPDATE;
  IF NOT FOUND OR v_status = 'failed' THEN
    RETURN;
  END IF;

  -- Empty maps complete through the cascade, which also releases their dependents and
  -- counts them off the run, so nothing is left half-done.
  PERFORM pgflow.cascade_complete_taskless_steps(start_ready_steps.run_id);
  SELECT array_agg(s.step_slug) INTO v_slugs FROM pgflow.steps s WHERE s.flow_slug = v_flow_slug;
  PERFORM pgflow._start_ready_steps(
    v_flow_slug, array_fill(start_ready_steps.run_id, ARRAY[cardinality(v_slugs)]), v_slugs);
END;
$$;

-- Completes the given runs that have no step left, in run_id order: their output (the
-- leaf steps' outputs), status and run:completed event. The callers hold the runs' row
-- locks or created them.
CREATE FUNCTION pgflow._complete_runs(p_run_ids uuid[])
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
DECLARE
  v_runs    uuid[];
  v_flows   text[];
  v_started timestamptz[];
  v_done    timestamptz[];
  v_outputs jsonb[];
BEGIN
  -- The leaf-output aggregate is only evaluated for the rows actually completing.
  WITH done AS (
    UPDATE pgflow.runs r
       SET status = 'completed',
           completed_at = now(),
           output = (
             SELECT coalesce(
                      jsonb_object_agg(leaf.step_slug,
                                       pgflow._step_output(r.run_id, leaf.step_slug, leaf.step_type)),
                      '{}'::jsonb)
               FROM pgflow.steps leaf
              WHERE leaf.flow_slug = r.flow_slug
                AND NOT EXISTS (
                  SELECT 1 FROM pgflow.deps d
                   WHERE d.flow_slug = leaf.flow_slug
                     AND d.dep_slug = leaf.step_slug
                )
           )
      FROM unnest(p_run_ids) AS f(run_id)
     WHERE r.run_id = f.run_id
       AND r.remaining_steps = 0
       -- IS TRUE keeps this off idx_runs_status: a plan cached while few runs were
       -- 'started' would otherwise scan every started run on each call.
       AND (r.status = 'started') IS TRUE
    RETURNING r.run_id, r.flow_slug, r.started_at, r.completed_at, r.output
  )
  SELECT array_agg(d.run_id ORDER BY d.run_id), array_agg(d.flow_slug ORDER BY d.run_id),
         array_agg(d.started_at ORDER BY d.run_id), array_agg(d.completed_at ORDER BY d.run_id),
         array_agg(d.output ORDER BY d.run_id)
    INTO v_runs, v_flows, v_started, v_done, v_outputs
    FROM done d;

  PERFORM pgflow._emit_all(ARRAY(
    SELECT jsonb_build_object(
             'event_type', 'run:completed',
             'run_id', e.run_id,
             'flow_slug', e.flow_slug,
             'status', 'completed',
             'started_at', e.started_at,
             'completed_at', e.completed_at,
             'output', e.output)
      FROM unnest(v_runs, v_flows, v_started, v_done, v_outputs) WITH ORDINALITY
           AS e(run_id, flow_slug, started_at, completed_at, output, ord)
     ORDER BY e.ord));
END;
$$;

CREATE FUNCTION pgflow.maybe_complete_run(run_id uuid)
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
  PERFORM pgflow._complete_runs(ARRAY[maybe_complete_run.run_id]);
END;
$$;

