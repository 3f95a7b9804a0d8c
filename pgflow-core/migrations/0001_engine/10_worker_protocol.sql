-- -------------------------------------------------------------------------------------
-- Worker protocol: start_tasks -> complete_task(s) / fail_task
-- -------------------------------------------------------------------------------------

CREATE FUNCTION pgflow._start_tasks(
  flow_slug text, msg_ids bigint[], worker_id uuid, p_set_vt boolean
)
RETURNS SETOF pgflow._started_task
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
ROWS 10
AS $$
DECLARE
  v_run_ids      uuid[];
  v_step_slugs   text[];
  v_task_indexes integer[];
  v_msg_ids      bigint[];
  v_inputs       jsonb[];
  v_attempts     integer[];
  v_timeouts     integer[];
  v_stale        record;
BEGIN
  -- Inputs are built in the same statement that starts the tasks. A map task reads one
  -- element, never a rebuilt parent array: element task_index of the run input (root
  -- map) or of a single parent's output, or the output of the map parent's task with
  -- the same task_index.
  -- A started task whose message is delivered again after its whole timeout has passed
  -- lost its worker (crashed, killed, cut off): its attempt is over. With attempts left it
  -- is started again below, like a queued one; without, it fails as a retry would. A
  -- duplicate delivery within the timeout is not a lost worker and is ignored.
  FOR v_stale IN
    SELECT t.run_id, t.step_slug, t.task_index, t.attempts_count,
           coalesce(s.opt_timeout, f.opt_timeout) AS timeout
      FROM pgflow.step_tasks t
      JOIN pgflow.runs r ON r.run_id = t.run_id
      JOIN pgflow.steps s ON s.flow_slug = t.flow_slug AND s.step_slug = t.step_slug
      JOIN pgflow.flows f ON f.flow_slug = t.flow_slug
     WHERE t.flow_slug = _start_tasks.flow_slug
       AND t.message_id = ANY(_start_tasks.msg_ids)
       AND t.status = 'started'
       AND r.status <> 'failed'
       AND t.started_at <= now() - make_interval(secs => coalesce(s.opt_timeout, f.opt_timeout))
       AND t.attempts_count >= coalesce(s.opt_max_attempts, f.opt_max_attempts)
     ORDER BY t.run_id, t.step_slug, t.task_index
  LOOP
    PERFORM pgflow.fail_task(v_stale.run_id, v_stale.step_slug, v_stale.task_index,
      format('Task did not finish within its timeout of %s seconds on attempt %s (its worker was lost)',
             v_stale.timeout, v_stale.attempts_count));
  END LOOP;

  WITH locked AS (
    SELECT t.run_id, t.step_slug, t.task_index
      FROM pgflow.step_tasks t
      JOIN pgflow.runs r ON r.run_id = t.run_id
      JOIN pgflow.steps s ON s.flow_slug = t.flow_slug AND s.step_slug = t.step_slug
      JOIN pgflow.flows f ON f.flow_slug = t.flow_slug
     WHERE t.flow_slug = _start_tasks.flow_slug
       AND t.message_id = ANY(_start_tasks.msg_ids)
       AND r.status <> 'failed'
       AND (t.status = 'queued'
            OR (t.status = 'started'
                AND t.started_at <= now() - make_interval(secs => coalesce(s.opt_timeout, f.opt_timeout))
                AND t.attempts_count < coalesce(s.opt_max_attempts, f.opt_max_attempts)))
     ORDER BY t.run_id, t.step_slug, t.task_index
       FOR NO KEY UPDATE OF t
  ),
  started AS (
    UPDATE pgflow.step_tasks t
       SET status = 'started',
           attempts_count = t.attempts_count + 1,
           started_at = now(),
           last_worker_id = _start_tasks.worker_id
      FROM locked l
     WHERE t.run_id = l.run_id
       AND t.step_slug = l.step_slug
       AND t.task_index = l.task_index
    RETURNING t.run_id, t.step_slug, t.task_index, t.message_id, t.attempts_count
  ),
  -- The arrays map tasks take elements from, fetched and decompressed once per
  -- (run, step) of the batch rather than once per task: `||` with an empty array hands
  -- back the detoasted array itself, which the materialised CTE then keeps in memory.
  arrays AS MATERIALIZED (
    SELECT g.run_id, g.step_slug, src.arr || '[]'::jsonb AS arr
      FROM (SELECT DISTINCT st.run_id, st.step_slug FROM started st) g
      JOIN pgflow.steps s ON s.flow_slug = _start_tasks.flow_slug AND s.step_slug = g.step_slug
      CROSS JOIN LATERAL (
        SELECT CASE
                 WHEN s.deps_count = 0 THEN
                   (SELECT r.input FROM pgflow.runs r WHERE r.run_id = g.run_id)
                 ELSE (
                   SELECT pt.output
                     FROM pgflow.deps d
                     JOIN pgflow.steps parent
                       ON parent.flow_slug = d.flow_slug AND parent.step_slug = d.dep_slug
                     JOIN pgflow.step_tasks pt
                       ON pt.run_id = g.run_id AND pt.step_slug = d.dep_slug AND pt.task_index = 0
                    WHERE d.flow_slug = s.flow_slug
                      AND d.step_slug = s.step_slug
                      AND parent.step_type = 'single')
               END AS arr
      ) src
     WHERE s.step_type = 'map'
       AND src.arr IS NOT NULL
  ),
  prepared AS (
    SELECT st.run_id, st.step_slug, st.task_index, st.message_id, st.attempts_count,
           coalesce(s.opt_timeout, f.opt_timeout) AS timeout,
           CASE
             WHEN s.step_type = 'map' AND a.arr IS NOT NULL THEN
               a.arr -> st.task_index
             WHEN s.step_type = 'map' THEN (
               SELECT pt.output
                 FROM pgflow.deps d
                 JOIN pgflow.step_tasks pt
                   ON pt.run_id = st.run_id AND pt.step_slug = d.dep_slug AND pt.task_index = st.task_index
                WHERE d.flow_slug = s.flow_slug
                  AND d.step_slug = s.step_slug)
             ELSE
               -- A single parent's output is read here, not through _step_output: that
               -- would be a function call per dependency of every task.
               jsonb_build_object('run', r.input) || coalesce((
                 SELECT jsonb_object_agg(
                          d.dep_slug,
                          CASE
                            WHEN parent.step_type = 'single' THEN (
                              SELECT pt.output
                                FROM pgflow.step_tasks pt
                               WHERE pt.run_id = st.run_id
                                 AND pt.step_slug = d.dep_slug
                                 AND pt.task_index = 0
                                 AND pt.status = 'completed')
                            ELSE pgflow._step_output(st.run_id, d.dep_slug, 'map')
                          END)
                   FROM pgflow.deps d
                   JOIN pgflow.steps parent
                     ON parent.flow_slug = d.flow_slug AND parent.step_slug = d.dep_slug
                  WHERE d.flow_slug = s.flow_slug
                    AND d.step_slug = s.step_slug), '{}'::jsonb)
           END AS input
      FROM started st
      JOIN pgflow.runs r ON r.run_id = st.run_id
      JOIN pgflow.steps s ON s.flow_slug = _start_tasks.flow_slug AND s.step_slug = st.step_slug
      JOIN pgflow.flows f ON f.flow_slug = _start_tasks.flow_slug
      LEFT JOIN arrays a ON a.run_id = st.run_id AND a.step_slug = st.step_slug
  )
  -- Plain aggregates over a sorted input: ordered aggregates cost more to set up than
  -- this whole statement takes to run for a small batch.
  SELECT array_agg(p.run_id), array_agg(p.step_slug), array_agg(p.task_index),
         array_agg(p.message_id), array_agg(p.input), array_agg(p.attempts_count),
         array_agg(p.timeout)
    INTO v_run_ids, v_step_slugs, v_task_indexes, v_msg_ids, v_inputs, v_attempts,
         v_timeouts
    FROM (SELECT * FROM prepared ORDER BY prepared.message_id) p;

  IF v_msg_ids IS NULL THEN
    RETURN;
  END IF;

  -- Messages last (lock level 5): the handler gets timeout + 2 seconds before the
  -- message reappears for another worker (unless the caller read them with that
  -- visibility already: _read_and_start). set_vt_batch's statement, run here directly
  -- (no function layer, no format_table_name, no rows returned): tasks were found, so
  -- flow_slug is a valid slug and its queue table is pgmq.q_<lower(slug)>.
  IF p_set_vt THEN
    EXECUTE format(
      'WITH locked AS ('
      '  SELECT q.msg_id FROM pgmq.%1$I q WHERE q.msg_id = ANY($1) ORDER BY q.msg_id FOR UPDATE'
      ') UPDATE pgmq.%1$I q'
      '     SET vt = clock_timestamp() + make_interval(secs => o.timeout + 2)'
      '    FROM locked'
      '    JOIN unnest($1, $2) AS o(msg_id, timeout) ON o.msg_id = locked.msg_id'
      '   WHERE q.msg_id = locked.msg_id',
      'q_' || lower(_start_tasks.flow_slug))
      USING v_msg_ids, v_timeouts;
  END IF;

  RETURN QUERY
  SELECT _start_tasks.flow_slug, u.run_id, u.step_slug, u.input, u.msg_id, u.task_index,
         u.attempt, u.timeout
    FROM unnest(v_run_ids, v_step_slugs, v_inputs, v_msg_ids, v_task_indexes, v_attempts,
                v_timeouts)
         AS u(run_id, step_slug, input, msg_id, task_index, attempt, timeout);
END;
$$;

CREATE FUNCTION pgflow.start_tasks(flow_slug text, msg_ids bigint[], worker_id uuid)
RETURNS SETOF pgflow.step_task_record
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
ROWS 10
AS $$
BEGIN
  RETURN QUERY
  SELECT t.flow_slug, t.run_id, t.step_slug, t.input, t.msg_id, t.task_index
    FROM pgflow._start_tasks(start_tasks.flow_slug, start_tasks.msg_ids,
                             start_tasks.worker_id, true) AS t;
END;
$$;

-- EXTENSION beyond pgflow 0.8.1: what pgmq.read(flow_slug, p_vt, p_qty) followed by
-- start_tasks over the ids read does, in one call: the Rust worker's read. Each message
-- read is hidden for its step's timeout + 2 seconds at once (what start_tasks would set
-- next), so a started task's message is updated once, not twice; a message whose task
-- does not start is hidden for p_vt seconds, as pgmq.read would leave it. Returns the
-- tasks started, with their attempt number and timeout. Messages are locked before
-- their tasks, which cannot deadlock with the engine: a message nobody has read only
-- meets a queued task, which nothing else locks.
--
-- The read goes through the queue's read function (_create_queue_functions), whose plan
-- is cached; a queue without one is read by pgmq.read, and start_tasks then sets the
-- visibility.
CREATE FUNCTION pgflow._read_and_start(
  p_flow_slug text, p_qty integer, p_vt integer, p_worker_id uuid
)
RETURNS SETOF pgflow._started_task
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
ROWS 10
AS $$
DECLARE
  v_ids   bigint[];
  v_tasks pgflow._started_task[];
  v_read  text;
BEGIN
  v_read := pgflow._queue_function('read', p_flow_slug);
  IF v_read IS NULL THEN
    -- A queue without its functions: pgmq's own read (a missing queue fails there with
    -- PostgreSQL's 42P01), and start_tasks sets the visibility as for any worker.
    RETURN QUERY
    SELECT * FROM pgflow._start_tasks(
      p_flow_slug,
      ARRAY(SELECT m.msg_id FROM pgmq.read(p_flow_slug, p_vt, p_qty) AS m ORDER BY m.msg_id),
      p_worker_id, true);
    RETURN;
  END IF;

  EXECUTE format('SELECT pgflow.%I($1, $2, $3)', v_read)
    INTO v_ids
    USING p_flow_slug, p_qty, p_vt;

  IF v_ids IS NULL THEN
    RETURN;
  END IF;

  v_tasks := ARRAY(
    SELECT t FROM pgflow._start_tasks(p_flow_slug, v_ids, p_worker_id, false) AS t);

  -- Rare: messages whose task did not start (a duplicate, a stray message) get the
  -- visibility pgmq.read gives.
  IF cardinality(v_tasks) < cardinality(v_ids) THEN
    EXECUTE format(
      'UPDATE pgmq.%I q SET vt = clock_timestamp() + make_interval(secs => $2)'
      ' WHERE q.msg_id = ANY($1)', 'q_' || lower(p_flow_slug))
      USING ARRAY(SELECT i FROM unnest(v_ids) AS i
                  EXCEPT SELECT t.msg_id FROM unnest(v_tasks) AS t),
            p_vt;
  END IF;

  RETURN QUERY SELECT * FROM unnest(v_tasks);
END;
$$;

-- EXTENSION beyond pgflow 0.8.1: complete many tasks in one call and one transaction,
-- with the semantics of calling complete_task for each of them: the Rust worker reports
-- a finished batch with it. Task i is (run_ids[i], step_slugs[i], task_indexes[i]) with
-- output outputs[i]; the arrays must have the same length. A task listed twice keeps its
-- first output. Returns one row per listed task that exists, ordered by (run_id,
-- step_slug, task_index), except tasks that caused a type violation (as complete_task,
-- which is this function with a batch of one). A type violation fails its run before any
-- other task of that run in the batch is looked at, as if its complete_task came first.
--
-- The work is set-based across the batch: one statement per kind of change (tasks, step
-- states, released dependents, run counters, started steps, sent messages), whatever
-- the number of tasks, steps and runs in it. Every statement joins on full primary keys
-- or tuple ids, so cached generic plans stay right however small or unanalysed the
-- tables are.
CREATE FUNCTION pgflow.complete_tasks(
  run_ids      uuid[],
  step_slugs   text[],
  task_indexes integer[],
  outputs      jsonb[]
)
RETURNS SETOF pgflow.step_tasks
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
ROWS 10
AS $$
DECLARE
  v_n           integer := coalesce(cardinality(complete_tasks.run_ids), 0);
  -- the batch's distinct tasks that exist, locked, in key order (lock order)
  v_rows        pgflow.step_tasks[];
  v_tids        tid[];
  v_outputs     jsonb[];
  -- one group per (run, step) with started tasks, in key order
  g_run         uuid[];
  g_step        text[];
  g_flow        text[];
  g_type        text[];
  g_count       integer[];
  g_first       integer[];
  g_completes   boolean[];
  g_initial     integer[];
  g_started_at  timestamptz[];
  v_failed      uuid[];
  v_may_violate boolean;
  -- dependents released by the steps that finished
  d_run         uuid[];
  d_step        text[];
  d_count       integer[];
  d_tasks       integer[];
  d_is_map      boolean[];
  d_starts      boolean[];
  v_skip        integer[] := '{}';
  v_violation   record;
  v_type        text;
  v_msgs        bigint[];
  v_archive     bigint[] := '{}';
  v_archive_q   text[] := '{}';
  v_realtime    boolean;
  v_ready_runs  uuid[];
  v_ready       text[];
  v_ready_flows text[];
  v_start_runs  uuid[];
  v_start_steps text[];
  v_cascade     uuid[];
  v_finished    uuid[];
  v_flow        text;
  v_run         uuid;
BEGIN
  IF coalesce(cardinality(complete_tasks.step_slugs), 0) <> v_n
     OR coalesce(cardinality(complete_tasks.task_indexes), 0) <> v_n
     OR coalesce(cardinality(complete_tasks.outputs), 0) <> v_n THEN
    RAISE EXCEPTION 'run_ids, step_slugs, task_indexes and outputs must have the same length (got %, %, %, %)',
      v_n, coalesce(cardinality(complete_tasks.step_slugs), 0),
      coalesce(cardinality(complete_tasks.task_indexes), 0),
      coalesce(cardinality(complete_tasks.outputs), 0);
  END IF;

  -- Lock level 1: every task row of the batch, in key order, before anything else.
  SELECT array_agg(l.task), array_agg(l.tid), array_agg(l.output)
    INTO v_rows, v_tids, v_outputs
    FROM (
      SELECT t AS task, t.ctid AS tid, b.output
        FROM (
          SELECT DISTINCT ON (u.run_id, u.step_slug, u.task_index)
                 u.run_id, u.step_slug, u.task_index, u.output
            FROM unnest(complete_tasks.run_ids, complete_tasks.step_slugs,
                        complete_tasks.task_indexes, complete_tasks.outputs)
                 WITH ORDINALITY AS u(run_id, step_slug, task_index, output, ord)
           ORDER BY u.run_id, u.step_slug, u.task_index, u.ord
        ) b
        JOIN pgflow.step_tasks t
          ON t.run_id = b.run_id AND t.step_slug = b.step_slug AND t.task_index = b.task_index
       ORDER BY t.run_id, t.step_slug, t.task_index
         FOR NO KEY UPDATE OF t
    ) l;

  IF v_rows IS NULL THEN
    RETURN;
  END IF;

  -- Lock level 2: the step states of the started tasks, in key order, all of them before
  -- any run lock is taken, read as locked (the latest versions). Whether a finishing
  -- single step's output is not an array is noted here, so that the type-violation query
  -- runs only when one might be.
  SELECT array_agg(q.run_id), array_agg(q.step_slug), array_agg(q.flow_slug),
         array_agg(q.step_type), array_agg(q.n), array_agg(q.first_ord),
         array_agg(q.completes), array_agg(q.initial_tasks), array_agg(q.started_at),
         coalesce(bool_or(q.completes AND q.step_type = 'single'
                          AND jsonb_typeof(v_outputs[q.first_ord]) IS DISTINCT FROM 'array'),
                  false)
    INTO g_run, g_step, g_flow, g_type, g_count, g_first, g_completes, g_initial, g_started_at,
         v_may_violate
    FROM (
      SELECT g.run_id, g.step_slug, ss.flow_slug, s.step_type, g.n, g.first_ord,
             ss.status = 'started' AND ss.remaining_tasks <= g.n AS completes,
             ss.initial_tasks, ss.started_at
        FROM (SELECT x.run_id, x.step_slug, count(*)::integer AS n,
                     min(x.ordinality)::integer AS first_ord
                FROM unnest(v_rows) WITH ORDINALITY AS x
               WHERE x.status = 'started'
               GROUP BY x.run_id, x.step_slug) g
        JOIN pgflow.step_states ss ON ss.run_id = g.run_id AND ss.step_slug = g.step_slug
        JOIN pgflow.steps s ON s.flow_slug = ss.flow_slug AND s.step_slug = ss.step_slug
       ORDER BY g.run_id, g.step_slug
         FOR NO KEY UPDATE OF ss
    ) q;

  IF g_run IS NULL THEN
    RETURN QUERY SELECT x.* FROM unnest(v_rows) AS x;
    RETURN;
  END IF;

  -- Lock level 3: the runs in which a step finishes, in run_id order, before any change.
  PERFORM 1
     FROM pgflow.runs r
    WHERE r.run_id IN (SELECT c.run_id FROM unnest(g_run, g_completes) AS c(run_id, completes)
                        WHERE c.completes)
    ORDER BY r.run_id
      FOR NO KEY UPDATE;

  -- By key, never through idx_runs_status: failed runs pile up over time.
  v_failed := ARRAY(
    SELECT r.run_id FROM pgflow.runs r
     WHERE r.run_id = ANY(g_run) AND (r.status = 'failed') IS TRUE);

  -- Type violations: a single step that finishes with a non-array output while a map
  -- depending on it still waits for its array fails its task and its run.
  IF v_may_violate THEN
    FOR v_violation IN
      SELECT j, child.step_slug AS child_slug
        FROM generate_subscripts(g_run, 1) AS j
       CROSS JOIN LATERAL (
         SELECT cs.step_slug
           FROM pgflow.deps d
           JOIN pgflow.steps cs ON cs.flow_slug = d.flow_slug AND cs.step_slug = d.step_slug
           JOIN pgflow.step_states css ON css.run_id = g_run[j] AND css.step_slug = d.step_slug
          WHERE d.flow_slug = g_flow[j]
            AND d.dep_slug = g_step[j]
            AND cs.step_type = 'map'
            AND css.initial_tasks IS NULL
          ORDER BY cs.step_index
          LIMIT 1
       ) child
       WHERE g_completes[j]
         AND g_type[j] = 'single'
         AND jsonb_typeof(v_outputs[g_first[j]]) IS DISTINCT FROM 'array'
         AND NOT (g_run[j] = ANY(v_failed))
       ORDER BY j
    LOOP
      v_type := coalesce(jsonb_typeof(v_outputs[g_first[v_violation.j]]), 'null');

      UPDATE pgflow.step_tasks t
         SET status = 'failed',
             failed_at = now(),
             output = v_outputs[g_first[v_violation.j]],
             error_message = '[TYPE_VIOLATION] Produced ' || v_type || ' instead of array'
       WHERE t.ctid = v_tids[g_first[v_violation.j]];

      v_msgs := pgflow._fail_run(
        g_run[v_violation.j], g_flow[v_violation.j], g_step[v_violation.j],
        '[TYPE_VIOLATION] Map step ' || v_violation.child_slug
          || ' expects array input but dependency ' || g_step[v_violation.j]
          || ' produced ' || v_type);

      v_msgs := v_msgs || v_rows[g_first[v_violation.j]].message_id;
      v_archive_q := v_archive_q || array_fill(g_flow[v_violation.j], ARRAY[cardinality(v_msgs)]);
      v_archive := v_archive || v_msgs;
      v_skip := v_skip || g_first[v_violation.j];
      v_failed := v_failed || g_run[v_violation.j];
    END LOOP;
  END IF;

  -- The tasks, by the tuple ids locked above; their messages are archived last.
  WITH done AS (
    UPDATE pgflow.step_tasks t
       SET status = 'completed',
           completed_at = now(),
           output = u.output
      FROM (SELECT v_tids[x.ordinality] AS tid, v_outputs[x.ordinality] AS output
              FROM unnest(v_rows) WITH ORDINALITY AS x
             WHERE x.status = 'started'
               AND NOT (x.run_id = ANY(v_failed))) u
     WHERE t.ctid = u.tid
    RETURNING t.flow_slug, t.message_id
  )
  SELECT v_archive_q || coalesce(array_agg(done.flow_slug), '{}'),
         v_archive || coalesce(array_agg(done.message_id), '{}')
    INTO v_archive_q, v_archive
    FROM done;

  UPDATE pgflow.step_states ss
     SET remaining_tasks = CASE WHEN c.completes THEN 0 ELSE ss.remaining_tasks - c.n END,
         status = CASE WHEN c.completes THEN 'completed' ELSE ss.status END,
         completed_at = CASE WHEN c.completes THEN now() ELSE ss.completed_at END
    FROM unnest(g_run, g_step, g_count, g_completes) AS c(run_id, step_slug, n, completes)
   WHERE ss.run_id = c.run_id
     AND ss.step_slug = c.step_slug
     AND NOT (c.run_id = ANY(v_failed));

  -- Follow-up work only when a step finished.
  IF EXISTS (SELECT 1 FROM unnest(g_run, g_completes) AS c(run_id, completes)
              WHERE c.completes AND NOT (c.run_id = ANY(v_failed))) THEN
    -- Steps that finished: their events first, in key order, so a parent's event precedes
    -- those of the children it releases. A map's assembled array only travels in realtime
    -- payloads (NOTIFY drops outputs), so it is built only where realtime exists.
    v_realtime := pgflow._has_realtime();
    PERFORM pgflow._emit_all(ARRAY(
      SELECT jsonb_build_object(
               'event_type', 'step:completed',
               'run_id', c.run_id,
               'flow_slug', c.flow_slug,
               'step_slug', c.step_slug,
               'status', 'completed',
               'started_at', c.started_at,
               'completed_at', now(),
               'remaining_tasks', 0,
               'output', CASE
                 WHEN c.step_type = 'single' THEN v_outputs[c.first_ord]
                 WHEN v_realtime THEN pgflow._step_output(c.run_id, c.step_slug, 'map')
               END)
        FROM unnest(g_run, g_step, g_flow, g_type, g_first, g_started_at, g_completes)
             WITH ORDINALITY
             AS c(run_id, step_slug, flow_slug, step_type, first_ord, started_at, completes, ord)
       WHERE c.completes
         AND NOT (c.run_id = ANY(v_failed))
       ORDER BY c.ord));

    -- Their dependents (lock level 4, under the run locks taken above): one dependency
    -- fewer per finished parent. A dependent map learns its task count here: the length of
    -- its single parent's array, or its map parent's task count (a map has one parent,
    -- and the type-violation check ran before). Keys are gathered first so that each
    -- update joins a list of full primary keys to one table: a plan cached while the
    -- tables were small cannot then pick a partial key.
    -- A dependent that becomes ready with tasks is marked started in the same update
    -- (and its tasks sent below), unless its run has an empty map becoming ready too:
    -- such a run goes through the cascade, which starts its ready steps in order.
    SELECT array_agg(rel.run_id), array_agg(rel.step_slug), array_agg(rel.n),
           array_agg(rel.map_tasks), array_agg(rel.is_map), array_agg(rel.starts)
      INTO d_run, d_step, d_count, d_tasks, d_is_map, d_starts
      FROM (
        SELECT x.run_id, x.step_slug, x.n, x.map_tasks, x.is_map,
               x.ready AND x.tasks > 0
                 AND NOT bool_or(x.ready AND coalesce(x.tasks, 0) = 0)
                           OVER (PARTITION BY x.run_id) AS starts
          FROM (
            SELECT g.run_id, g.step_slug, g.n, g.map_tasks, g.is_map,
                   ss.status = 'created' AND ss.remaining_deps = g.n AS ready,
                   CASE
                     WHEN g.is_map AND ss.initial_tasks IS NULL THEN g.map_tasks
                     ELSE ss.initial_tasks
                   END AS tasks
              FROM (
                SELECT f.run_id, d.step_slug, count(*)::integer AS n,
                       bool_and(cs.step_type = 'map') AS is_map,
                       max(CASE
                             WHEN f.step_type = 'map' THEN f.initial_tasks
                             WHEN jsonb_typeof(v_outputs[f.first_ord]) = 'array'
                               THEN jsonb_array_length(v_outputs[f.first_ord])
                           END) AS map_tasks
                  FROM unnest(g_run, g_step, g_flow, g_type, g_initial, g_first, g_completes)
                       AS f(run_id, step_slug, flow_slug, step_type, initial_tasks, first_ord,
                            completes)
                  JOIN pgflow.deps d ON d.flow_slug = f.flow_slug AND d.dep_slug = f.step_slug
                  JOIN pgflow.steps cs ON cs.flow_slug = d.flow_slug AND cs.step_slug = d.step_slug
                 WHERE f.completes
                   AND NOT (f.run_id = ANY(v_failed))
                 GROUP BY f.run_id, d.step_slug
              ) g
              JOIN pgflow.step_states ss ON ss.run_id = g.run_id AND ss.step_slug = g.step_slug
          ) x
         ORDER BY x.run_id, x.step_slug
      ) rel;

    WITH released AS (
      UPDATE pgflow.step_states child
         SET remaining_deps = child.remaining_deps - rel.n,
             initial_tasks = CASE
               WHEN rel.is_map AND child.initial_tasks IS NULL THEN rel.map_tasks
               ELSE child.initial_tasks
             END,
             status = CASE WHEN rel.starts THEN 'started' ELSE child.status END,
             started_at = CASE WHEN rel.starts THEN now() ELSE child.started_at END,
             remaining_tasks = CASE
               WHEN NOT rel.starts THEN child.remaining_tasks
               WHEN rel.is_map AND child.initial_tasks IS NULL THEN rel.map_tasks
               ELSE child.initial_tasks
             END
        FROM unnest(d_run, d_step, d_count, d_tasks, d_is_map, d_starts)
             AS rel(run_id, step_slug, n, map_tasks, is_map, starts)
       WHERE child.run_id = rel.run_id
         AND child.step_slug = rel.step_slug
      RETURNING child.run_id, child.flow_slug, child.step_slug, child.status,
                child.remaining_deps, child.initial_tasks, rel.starts
    ),
    counted AS (
      UPDATE pgflow.runs r
         SET remaining_steps = r.remaining_steps - f.n
        FROM (SELECT c.run_id, count(*)::integer AS n
                FROM unnest(g_run, g_completes) AS c(run_id, completes)
               WHERE c.completes
                 AND NOT (c.run_id = ANY(v_failed))
               GROUP BY c.run_id) f
       WHERE r.run_id = f.run_id
      RETURNING r.run_id, r.remaining_steps
    )
    -- Released steps marked started above have their tasks sent here; an empty map among
    -- the released (no tasks) sends its run through the cascade.
    SELECT ready.runs, ready.steps, ready.flows, ready.cascade, finished.runs
      INTO v_ready_runs, v_ready, v_ready_flows, v_cascade, v_finished
      FROM (SELECT array_agg(rel.run_id ORDER BY rel.run_id, rel.step_slug)
                     FILTER (WHERE rel.starts) AS runs,
                   array_agg(rel.step_slug ORDER BY rel.run_id, rel.step_slug)
                     FILTER (WHERE rel.starts) AS steps,
                   array_agg(rel.flow_slug ORDER BY rel.run_id, rel.step_slug)
                     FILTER (WHERE rel.starts) AS flows,
                   array_agg(DISTINCT rel.run_id)
                     FILTER (WHERE rel.status = 'created' AND rel.remaining_deps = 0
                               AND coalesce(rel.initial_tasks, 0) = 0) AS cascade
              FROM released rel) ready,
           (SELECT array_agg(cnt.run_id ORDER BY cnt.run_id) AS runs
              FROM counted cnt WHERE cnt.remaining_steps = 0) finished;

    -- Follow-ups only for runs where a step finished: start the dependents released (a run
    -- with an empty map among them goes through the cascade, which starts the others too),
    -- then complete the runs with no step left.
    FOR v_run IN SELECT unnest(v_cascade) LOOP
      PERFORM pgflow.start_ready_steps(v_run);
      PERFORM pgflow.maybe_complete_run(v_run);
    END LOOP;

    IF v_ready IS NOT NULL THEN
      FOR v_flow IN SELECT DISTINCT f.flow FROM unnest(v_ready_flows) AS f(flow) LOOP
        SELECT array_agg(p.run_id), array_agg(p.step_slug)
          INTO v_start_runs, v_start_steps
          FROM unnest(v_ready_runs, v_ready, v_ready_flows) AS p(run_id, step_slug, flow)
         WHERE p.flow = v_flow;
        PERFORM pgflow._start_ready_steps(v_flow, v_start_runs, v_start_steps, true);
      END LOOP;
    END IF;

    IF v_finished IS NOT NULL THEN
      PERFORM pgflow._complete_runs(ARRAY(
        SELECT f.run_id FROM unnest(v_finished) AS f(run_id)
         WHERE NOT (f.run_id = ANY(coalesce(v_cascade, '{}')))));
    END IF;
  END IF;

  -- Lock level 5, last.
  PERFORM pgflow._archive_batch(v_archive_q, v_archive);

  RETURN QUERY
    SELECT t.* FROM unnest(v_rows) WITH ORDINALITY AS x
      JOIN pgflow.step_tasks t
        ON t.run_id = x.run_id AND t.step_slug = x.step_slug AND t.task_index = x.task_index
     WHERE NOT x.ordinality = ANY(v_skip)
     ORDER BY x.ordinality;
END;
$$;

CREATE FUNCTION pgflow.complete_task(run_id uuid, step_slug text, task_index integer, output jsonb)
RETURNS SETOF pgflow.step_tasks
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
BEGIN
  RETURN QUERY
  SELECT * FROM pgflow.complete_tasks(
    ARRAY[complete_task.run_id],
    ARRAY[complete_task.step_slug],
    ARRAY[complete_task.task_index],
    ARRAY[complete_task.output]);
END;
$$;

CREATE FUNCTION pgflow.fail_task(run_id uuid, step_slug text, task_index integer, error_message text)
RETURNS SETOF pgflow.step_tasks
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
DECLARE
  v_flow_slug    text;
  v_run_status   text;
  v_task         pgflow.step_tasks;
  v_max_attempts integer;
  v_base_delay   integer;
  v_msgs         bigint[];
BEGIN
  -- Lock level 1: the task row.
  SELECT * INTO v_task
    FROM pgflow.step_tasks t
   WHERE t.run_id = fail_task.run_id
     AND t.step_slug = fail_task.step_slug
     AND t.task_index = fail_task.task_index
     FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;

  SELECT r.flow_slug, r.status INTO v_flow_slug, v_run_status
    FROM pgflow.runs r
   WHERE r.run_id = fail_task.run_id;

  IF v_run_status <> 'failed' AND v_task.status = 'started' THEN
    SELECT coalesce(s.opt_max_attempts, f.opt_max_attempts),
           coalesce(s.opt_base_delay, f.opt_base_delay)
      INTO v_max_attempts, v_base_delay
      FROM pgflow.steps s
      JOIN pgflow.flows f ON f.flow_slug = s.flow_slug
     WHERE s.flow_slug = v_flow_slug
       AND s.step_slug = fail_task.step_slug;

    IF v_task.attempts_count < v_max_attempts THEN
      -- Retry: back to queued; the message reappears after the backoff. No step or
      -- run lock needed, nothing else changes.
      UPDATE pgflow.step_tasks t
         SET status = 'queued',
             started_at = NULL,
             error_message = fail_task.error_message
       WHERE t.run_id = fail_task.run_id
         AND t.step_slug = fail_task.step_slug
         AND t.task_index = fail_task.task_index
      RETURNING * INTO v_task;

      IF v_task.message_id IS NOT NULL THEN
        PERFORM pgmq.set_vt(v_flow_slug, v_task.message_id,
                            pgflow.calculate_retry_delay(v_base_delay, v_task.attempts_count));
      END IF;
      RETURN NEXT v_task;
      RETURN;
    END IF;

    -- Exhausted: lock level 2 then 3, and look at the run again under its lock.
    PERFORM 1
       FROM pgflow.step_states ss
      WHERE ss.run_id = fail_task.run_id
        AND ss.step_slug = fail_task.step_slug
        FOR NO KEY UPDATE;
    SELECT r.status INTO v_run_status
      FROM pgflow.runs r
     WHERE r.run_id = fail_task.run_id
       FOR NO KEY UPDATE;
  END IF;

  IF v_task.status = 'started' THEN
    UPDATE pgflow.step_tasks t
       SET status = 'failed',
           failed_at = now(),
           error_message = fail_task.error_message
     WHERE t.run_id = fail_task.run_id
       AND t.step_slug = fail_task.step_slug
       AND t.task_index = fail_task.task_index
    RETURNING * INTO v_task;

    IF v_run_status <> 'failed' THEN
      v_msgs := pgflow._fail_run(fail_task.run_id, v_flow_slug, fail_task.step_slug,
                                 fail_task.error_message);
    END IF;
  END IF;

  -- A task that was not started changes nothing; on a failed run its message goes to
  -- the archive all the same (it cannot be needed any more).
  IF v_task.status = 'failed' OR v_run_status = 'failed' THEN
    PERFORM pgflow._archive_messages(v_flow_slug, array_append(v_msgs, v_task.message_id));
  END IF;

  RETURN NEXT v_task;
END;
$$;

