-- =====================================================================================
-- pgflow engine, migration 0002: a report applies only to the attempt it belongs to.
--
-- A worker paused (SIGSTOP, a handler blocking its thread) past its task's timeout may
-- report after another worker has started the task's next attempt. pgflow 0.8.1's
-- complete_task and fail_task name a task, not an attempt, so such a late report used to
-- land on the new attempt: its failure failed a run whose new attempt was about to
-- succeed. The forms added here carry the attempt that ran (and the worker that ran it)
-- and change nothing when that attempt is no longer the task's current one: the task is
-- not `started`, or was started again since (attempts_count moved on), or by another
-- worker. Such a report returns no row and leaves a LOG line in the server's log.
--
-- The 0.8.1 signatures stay and keep their meaning (whatever attempt is started); an
-- attempt of NULL in the new forms means the same.
--
-- EXTENSIONS beyond pgflow 0.8.1 (additive):
--   complete_tasks(run_ids, step_slugs, task_indexes, outputs, attempts, worker_ids)
--   complete_task(run_id, step_slug, task_index, output, attempt, worker_id)
--   fail_task(run_id, step_slug, task_index, error_message, attempt, worker_id, permanent)
-- `permanent` fails the task without a retry, whatever attempts are left: a handler's
-- error that another attempt cannot fix. The lock order of 0001's header holds.
-- =====================================================================================

CREATE FUNCTION pgflow.complete_tasks(
  run_ids      uuid[],
  step_slugs   text[],
  task_indexes integer[],
  outputs      jsonb[],
  attempts     integer[],
  worker_ids   uuid[] DEFAULT NULL
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
  v_n     integer := coalesce(cardinality(complete_tasks.run_ids), 0);
  v_keep  integer[];
  v_stale record;
BEGIN
  IF coalesce(cardinality(complete_tasks.step_slugs), 0) <> v_n
     OR coalesce(cardinality(complete_tasks.task_indexes), 0) <> v_n
     OR coalesce(cardinality(complete_tasks.outputs), 0) <> v_n
     OR coalesce(cardinality(complete_tasks.attempts), 0) <> v_n
     OR (complete_tasks.worker_ids IS NOT NULL
         AND cardinality(complete_tasks.worker_ids) <> v_n) THEN
    RAISE EXCEPTION 'run_ids, step_slugs, task_indexes, outputs, attempts and worker_ids must have the same length (got %, %, %, %, %, %)',
      v_n, coalesce(cardinality(complete_tasks.step_slugs), 0),
      coalesce(cardinality(complete_tasks.task_indexes), 0),
      coalesce(cardinality(complete_tasks.outputs), 0),
      coalesce(cardinality(complete_tasks.attempts), 0),
      coalesce(cardinality(complete_tasks.worker_ids), v_n);
  END IF;

  -- Lock level 1, as the four-argument form takes it: the attempt compared here is then
  -- the one completed there, whatever a worker starting the task again does meanwhile.
  PERFORM 1
     FROM unnest(complete_tasks.run_ids, complete_tasks.step_slugs, complete_tasks.task_indexes)
          AS b(run_id, step_slug, task_index)
     JOIN pgflow.step_tasks t
       ON t.run_id = b.run_id AND t.step_slug = b.step_slug AND t.task_index = b.task_index
    ORDER BY t.run_id, t.step_slug, t.task_index
      FOR NO KEY UPDATE OF t;

  -- A multi-argument unnest pads a NULL worker_ids with NULLs: any worker.
  v_keep := ARRAY(
    SELECT b.ord
      FROM unnest(complete_tasks.run_ids, complete_tasks.step_slugs,
                  complete_tasks.task_indexes, complete_tasks.attempts,
                  complete_tasks.worker_ids)
           WITH ORDINALITY AS b(run_id, step_slug, task_index, attempt, worker_id, ord)
      JOIN pgflow.step_tasks t
        ON t.run_id = b.run_id AND t.step_slug = b.step_slug AND t.task_index = b.task_index
     WHERE b.attempt IS NULL
        OR (t.status = 'started'
            AND t.attempts_count = b.attempt
            AND (b.worker_id IS NULL OR t.last_worker_id = b.worker_id))
     ORDER BY b.ord);

  IF cardinality(v_keep) < v_n THEN
    FOR v_stale IN
      SELECT b.run_id, b.step_slug, b.task_index, b.attempt
        FROM unnest(complete_tasks.run_ids, complete_tasks.step_slugs,
                    complete_tasks.task_indexes, complete_tasks.attempts)
             WITH ORDINALITY AS b(run_id, step_slug, task_index, attempt, ord)
       WHERE NOT b.ord = ANY(v_keep)
    LOOP
      RAISE LOG 'pgflow: completion of %/%/% ignored: attempt % is not the task''s current attempt',
        v_stale.run_id, v_stale.step_slug, v_stale.task_index, v_stale.attempt;
    END LOOP;
  END IF;

  IF cardinality(v_keep) = 0 THEN
    RETURN;
  END IF;

  RETURN QUERY
  SELECT * FROM pgflow.complete_tasks(
    ARRAY(SELECT complete_tasks.run_ids[k.i]
            FROM unnest(v_keep) WITH ORDINALITY AS k(i, o) ORDER BY k.o),
    ARRAY(SELECT complete_tasks.step_slugs[k.i]
            FROM unnest(v_keep) WITH ORDINALITY AS k(i, o) ORDER BY k.o),
    ARRAY(SELECT complete_tasks.task_indexes[k.i]
            FROM unnest(v_keep) WITH ORDINALITY AS k(i, o) ORDER BY k.o),
    ARRAY(SELECT complete_tasks.outputs[k.i]
            FROM unnest(v_keep) WITH ORDINALITY AS k(i, o) ORDER BY k.o));
END;
$$;

CREATE FUNCTION pgflow.complete_task(
  run_id     uuid,
  step_slug  text,
  task_index integer,
  output     jsonb,
  attempt    integer,
  worker_id  uuid DEFAULT NULL
)
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
    ARRAY[complete_task.output],
    ARRAY[complete_task.attempt],
    CASE WHEN complete_task.worker_id IS NULL THEN NULL ELSE ARRAY[complete_task.worker_id] END);
END;
$$;

-- 0.8.1's fail_task with the attempt check and `permanent`; the four-argument form below
-- is this one with neither.
CREATE FUNCTION pgflow.fail_task(
  run_id        uuid,
  step_slug     text,
  task_index    integer,
  error_message text,
  attempt       integer,
  worker_id     uuid DEFAULT NULL,
  permanent     boolean DEFAULT false
)
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

  IF fail_task.attempt IS NOT NULL
     AND (v_task.status <> 'started'
          OR v_task.attempts_count <> fail_task.attempt
          OR (fail_task.worker_id IS NOT NULL
              AND v_task.last_worker_id IS DISTINCT FROM fail_task.worker_id)) THEN
    RAISE LOG 'pgflow: failure of %/%/% ignored: attempt % is not the task''s current attempt (% is, %)',
      fail_task.run_id, fail_task.step_slug, fail_task.task_index, fail_task.attempt,
      v_task.attempts_count, v_task.status;
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

    IF v_task.attempts_count < v_max_attempts AND NOT coalesce(fail_task.permanent, false) THEN
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

    -- Exhausted (or permanent): lock level 2 then 3, and look at the run again under
    -- its lock.
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

CREATE OR REPLACE FUNCTION pgflow.fail_task(
  run_id uuid, step_slug text, task_index integer, error_message text
)
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
  SELECT * FROM pgflow.fail_task(fail_task.run_id, fail_task.step_slug, fail_task.task_index,
                                 fail_task.error_message, NULL::integer, NULL::uuid, false);
END;
$$;

REVOKE EXECUTE ON FUNCTION
  pgflow.complete_tasks(uuid[], text[], integer[], jsonb[], integer[], uuid[]),
  pgflow.complete_task(uuid, text, integer, jsonb, integer, uuid),
  pgflow.fail_task(uuid, text, integer, text, integer, uuid, boolean)
  FROM public;
