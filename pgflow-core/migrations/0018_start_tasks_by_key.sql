-- =====================================================================================
-- pgflow engine, migration 0018: starting tasks finds them by message id, whatever the
-- plan cache holds.
--
-- _start_tasks (0010) found the tasks of the messages it was given with
--   WHERE t.flow_slug = <flow> AND t.message_id = ANY(<ids>)
-- joined to steps, runs and flows, and left the way in to the planner. Under the function's
-- settings (generic plan, no sequential scan, nested loops only) the plan a worker's
-- session cached, on an empty or freshly analysed table alike, went in through the flow's
-- steps and scanned the primary key of step_tasks by its second column, step_slug: every
-- task the flow ever had, once per step, on every call. A one-worker chain5 benchmark
-- spent 19 ms per call there at 15,000 tasks (pg_stat_user_functions, auto_explain:
-- "Rows Removed by Filter: 1313" per step), and it grows with the table.
--
-- Now the tasks' keys are looked up first, one probe of idx_step_tasks_message_id per
-- message, with their steps' timeout and attempt limit; both queries then join that list
-- of full primary keys to step_tasks alone (the run's status in a sub-select), the shape
-- complete_tasks already uses so that a plan cached on small tables cannot pick a partial
-- key: joined to runs as well, the planner probed step_tasks by run_id alone and filtered
-- a fan-out's thousand tasks per row. Nothing else changes: the same conditions, locks in
-- key order, inputs and visibility update.
-- =====================================================================================

-- 0010's _start_tasks, its tasks found by key (above).
CREATE OR REPLACE FUNCTION pgflow._start_tasks(
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
  v_key_runs     uuid[];
  v_key_steps    text[];
  v_key_indexes  integer[];
  v_key_timeouts integer[];
  v_key_max      integer[];
BEGIN
  -- The tasks of these messages by key, one probe of the message-id index each, with
  -- their steps' timeout and attempt limit (this migration's header). The two queries
  -- below join these keys to step_tasks alone and read the run's status in a sub-select,
  -- so that no other table can lead the planner to a partial key; they keep every
  -- condition on the task, which a locked row is checked against again.
  SELECT array_agg(k.run_id), array_agg(k.step_slug), array_agg(k.task_index),
         array_agg(o.timeout), array_agg(o.max_attempts)
    INTO v_key_runs, v_key_steps, v_key_indexes, v_key_timeouts, v_key_max
    FROM (SELECT DISTINCT m.id FROM unnest(_start_tasks.msg_ids) AS m(id)) m
   CROSS JOIN LATERAL (
     SELECT x.run_id, x.step_slug, x.task_index
       FROM pgflow.step_tasks x
      WHERE x.message_id = m.id
        AND x.flow_slug = _start_tasks.flow_slug
     OFFSET 0
   ) k
   CROSS JOIN LATERAL (
     SELECT coalesce(s.opt_timeout, f.opt_timeout) AS timeout,
            coalesce(s.opt_max_attempts, f.opt_max_attempts) AS max_attempts
       FROM pgflow.steps s
       JOIN pgflow.flows f ON f.flow_slug = s.flow_slug
      WHERE s.flow_slug = _start_tasks.flow_slug
        AND s.step_slug = k.step_slug
     OFFSET 0
   ) o;

  IF v_key_runs IS NULL THEN
    RETURN;
  END IF;

  -- Inputs are built in the same statement that starts the tasks. A map task reads one
  -- element, never a rebuilt parent array: element task_index of the run input (root
  -- map) or of a single parent's output, or the output of the map parent's task with
  -- the same task_index.
  -- A started task whose message is delivered again after its whole timeout has passed
  -- lost its worker (crashed, killed, cut off): its attempt is over. With attempts left it
  -- is started again below, like a queued one; without, it fails as a retry would. A
  -- duplicate delivery within the timeout is not a lost worker and is ignored.
  FOR v_stale IN
    SELECT t.run_id, t.step_slug, t.task_index, t.attempts_count, k.timeout
      FROM unnest(v_key_runs, v_key_steps, v_key_indexes, v_key_timeouts, v_key_max)
           AS k(run_id, step_slug, task_index, timeout, max_attempts)
      JOIN pgflow.step_tasks t
        ON t.run_id = k.run_id AND t.step_slug = k.step_slug AND t.task_index = k.task_index
     WHERE t.flow_slug = _start_tasks.flow_slug
       AND t.message_id = ANY(_start_tasks.msg_ids)
       AND t.status = 'started'
       AND (SELECT r.status FROM pgflow.runs r WHERE r.run_id = t.run_id) <> 'failed'
       AND t.started_at <= now() - make_interval(secs => k.timeout)
       AND t.attempts_count >= k.max_attempts
     ORDER BY t.run_id, t.step_slug, t.task_index
  LOOP
    PERFORM pgflow.fail_task(v_stale.run_id, v_stale.step_slug, v_stale.task_index,
      pgflow._lost_attempt_message(v_stale.timeout, v_stale.attempts_count));
  END LOOP;

  WITH locked AS (
    SELECT t.run_id, t.step_slug, t.task_index
      FROM unnest(v_key_runs, v_key_steps, v_key_indexes, v_key_timeouts, v_key_max)
           AS k(run_id, step_slug, task_index, timeout, max_attempts)
      JOIN pgflow.step_tasks t
        ON t.run_id = k.run_id AND t.step_slug = k.step_slug AND t.task_index = k.task_index
     WHERE t.flow_slug = _start_tasks.flow_slug
       AND t.message_id = ANY(_start_tasks.msg_ids)
       AND (SELECT r.status FROM pgflow.runs r WHERE r.run_id = t.run_id) <> 'failed'
       AND (t.status = 'queued'
            OR (t.status = 'started'
                AND t.started_at <= now() - make_interval(secs => k.timeout)
                AND t.attempts_count < k.max_attempts))
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
                   SELECT ps.output
                     FROM pgflow.deps d
                     JOIN pgflow.steps parent
                       ON parent.flow_slug = d.flow_slug AND parent.step_slug = d.dep_slug
                     JOIN pgflow.step_states ps
                       ON ps.run_id = g.run_id AND ps.step_slug = d.dep_slug
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
               -- The dependencies' stored outputs, one row each (a map's array is not
               -- gathered again for every task); a skipped dependency is absent.
               jsonb_build_object('run', r.input) || coalesce((
                 SELECT jsonb_object_agg(d.dep_slug, ps.output)
                   FROM pgflow.deps d
                   JOIN pgflow.step_states ps
                     ON ps.run_id = st.run_id AND ps.step_slug = d.dep_slug
                  WHERE d.flow_slug = s.flow_slug
                    AND d.step_slug = s.step_slug
                    AND ps.status = 'completed'), '{}'::jsonb)
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
