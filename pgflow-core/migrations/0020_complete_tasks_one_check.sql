-- =====================================================================================
-- pgflow engine, migration 0020: a batched completion is checked once and locks once.
--
-- The attempt-checking complete_tasks (0002, in pgflow_private since 0004), which the Rust
-- worker calls for every batch of reports, went on into pgflow.complete_tasks, the checking
-- wrapper 0004 put in the moved function's place: each batch was authorised twice and went
-- through one more PL/pgSQL layer. It also locked the batch's tasks in one statement and
-- read them again in the next to keep the current attempts.
--
-- Now it goes straight to pgflow_private.complete_tasks (its caller, pgflow.complete_tasks,
-- has authorised the batch), and one statement locks the tasks whose attempt is current, in
-- key order (lock level 1), and keeps them. A task that changes while the statement waits
-- for its lock is checked again on its new version, as FOR NO KEY UPDATE does, so the
-- attempt kept is the one completed. When every report is current, the arguments go on as
-- given. Same answers, same log lines for stale reports.
-- =====================================================================================

CREATE OR REPLACE FUNCTION pgflow_private.complete_tasks(
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

  -- Lock level 1: the reports' tasks whose attempt is current, in key order. A multi-argument
  -- unnest pads a NULL worker_ids with NULLs: any worker.
  v_keep := ARRAY(
    SELECT l.ord
      FROM (
        SELECT b.ord
          FROM unnest(complete_tasks.run_ids, complete_tasks.step_slugs,
                      complete_tasks.task_indexes, complete_tasks.attempts,
                      complete_tasks.worker_ids)
               WITH ORDINALITY AS b(run_id, step_slug, task_index, attempt, worker_id, ord)
          JOIN pgflow.step_tasks t
            ON t.run_id = b.run_id AND t.step_slug = b.step_slug
           AND t.task_index = b.task_index
         WHERE b.attempt IS NULL
            OR (t.status = 'started'
                AND t.attempts_count = b.attempt
                AND (b.worker_id IS NULL OR t.last_worker_id = b.worker_id))
         ORDER BY t.run_id, t.step_slug, t.task_index
           FOR NO KEY UPDATE OF t
      ) l
     ORDER BY l.ord);

  IF cardinality(v_keep) = v_n THEN
    RETURN QUERY
    SELECT * FROM pgflow_private.complete_tasks(
      complete_tasks.run_ids, complete_tasks.step_slugs, complete_tasks.task_indexes,
      complete_tasks.outputs);
    RETURN;
  END IF;

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

  IF cardinality(v_keep) = 0 THEN
    RETURN;
  END IF;

  RETURN QUERY
  SELECT * FROM pgflow_private.complete_tasks(
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
