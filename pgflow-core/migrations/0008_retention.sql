-- =====================================================================================
-- pgflow engine, migration 0008: retention. Deletes the runs that ended long ago with
-- everything they left behind, in batches small enough that workers keep running.
--
-- pgflow documents pgflow.prune_data_older_than(retention_interval interval) RETURNS void
-- as a snippet to install by hand; here it is part of the engine, under that name and
-- signature, next to the batched form it is made of. Everything is additive.
--
-- WHAT A RUN TAKES WITH IT
-- ------------------------
-- A run is pruned when its status is completed, failed or cancelled and the time it
-- ended (completed_at, failed_at or cancelled_at) is before the cutoff; a started run
-- never is, however old. With it go its step_states, its step_tasks (and through their
-- ON DELETE CASCADE pgflow_ext.step_task_attempts; pgflow_ext.run_retries cascades from
-- the run), the messages of its tasks still in the flow's queue pgmq.q_<lower(flow)>
-- and their rows in the queue's archive pgmq.a_<lower(flow)>, found by msg_id (the
-- tasks' message_id; indexed). A run that was retried also had messages before its
-- retry that no task names any more: for those runs only, the archive is searched by
-- message->>'run_id' (not indexed: a scan of that archive per batch holding such runs).
--
-- Workers (pgflow.workers) go separately, by last_heartbeat_at, never one that a started
-- task names as its last worker. step_tasks.last_worker_id is ON DELETE SET NULL and has
-- no index (it would cost every task start a non-HOT update): each worker row deleted
-- makes PostgreSQL scan step_tasks once, so prune the runs first, which shrinks it.
--
-- LOCK ORDER
-- ----------
-- 0001's order, per batch: the runs' tasks, their step states, the runs, then the
-- messages (level 5). Each level is taken FOR UPDATE SKIP LOCKED: a late report, a
-- retry or a reader may hold a row of an ended run, and a run with any row held by
-- someone else is left whole for a later batch instead of waited for. The run rows are
-- looked at again under their lock: a run retried meanwhile is started again and stays.
-- A message a worker is reading right now is left to that worker, which finds no task
-- for it and archives it (_drop_dead_messages); such a row then outlives its run in the
-- archive, and pgmq's own archive cleanup (or a later archived_at-based delete) is the
-- only thing that removes it.
--
-- BATCHES
-- -------
-- pgflow.prune_runs(older_than, max_runs) deletes at most max_runs runs in the caller's
-- transaction and says how much it deleted: callers loop, one transaction per call, until
-- it deletes no run; each batch holds its locks only for itself. prune_data_older_than
-- does all of it in one call (one transaction): what pg_cron calls once a day, when the
-- backlog is a day's worth. A first prune of months of history is better done with the
-- batched form (Client::prune, `pgflow prune`). idx_runs_ended_at finds the oldest ended
-- runs without reading the others; it holds only ended runs, and a run's row already
-- changes an indexed column (status) when it ends, so it costs the hot path no HOT update.
-- =====================================================================================

CREATE INDEX idx_runs_ended_at
  ON pgflow.runs ((coalesce(completed_at, failed_at, cancelled_at)), run_id)
  WHERE status IN ('completed', 'failed', 'cancelled');

-- -------------------------------------------------------------------------------------
-- Runs
-- -------------------------------------------------------------------------------------

-- Prunes those of the runs p_run_ids that ended before p_older_than, in the lock order
-- above, passing over any run a concurrent transaction holds a row of. Returns how many
-- runs, tasks and queue + archive messages it deleted.
CREATE FUNCTION pgflow._prune_runs(
  p_run_ids uuid[], p_older_than timestamptz,
  OUT runs_deleted integer, OUT tasks_deleted integer, OUT messages_deleted integer
)
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_runs    uuid[];
  v_flow    record;
  v_free    bigint[];
  v_count   integer;
BEGIN
  runs_deleted := 0;
  tasks_deleted := 0;
  messages_deleted := 0;

  -- Level 1: the tasks, in key order; a run with a task held elsewhere is left out.
  v_runs := ARRAY(
    WITH locked AS MATERIALIZED (
      SELECT t.run_id
        FROM pgflow.step_tasks t
       WHERE t.run_id = ANY(p_run_ids)
       ORDER BY t.run_id, t.step_slug, t.task_index
         FOR UPDATE SKIP LOCKED),
    held AS (SELECT l.run_id, count(*) AS n FROM locked l GROUP BY l.run_id),
    total AS (SELECT t.run_id, count(*) AS n
                FROM pgflow.step_tasks t
               WHERE t.run_id = ANY(p_run_ids)
               GROUP BY t.run_id)
    SELECT r.id
      FROM unnest(p_run_ids) AS r(id)
      LEFT JOIN held h ON h.run_id = r.id
      LEFT JOIN total a ON a.run_id = r.id
     WHERE coalesce(h.n, 0) = coalesce(a.n, 0));

  -- Level 2: the step states, likewise.
  v_runs := ARRAY(
    WITH locked AS MATERIALIZED (
      SELECT ss.run_id
        FROM pgflow.step_states ss
       WHERE ss.run_id = ANY(v_runs)
       ORDER BY ss.run_id, ss.step_slug
         FOR UPDATE SKIP LOCKED),
    held AS (SELECT l.run_id, count(*) AS n FROM locked l GROUP BY l.run_id),
    total AS (SELECT ss.run_id, count(*) AS n
                FROM pgflow.step_states ss
               WHERE ss.run_id = ANY(v_runs)
               GROUP BY ss.run_id)
    SELECT r.id
      FROM unnest(v_runs) AS r(id)
      LEFT JOIN held h ON h.run_id = r.id
      LEFT JOIN total a ON a.run_id = r.id
     WHERE coalesce(h.n, 0) = coalesce(a.n, 0));

  -- Level 3: the runs, looked at again under their lock: still ended, and long enough ago.
  v_runs := ARRAY(
    SELECT r.run_id
      FROM pgflow.runs r
     WHERE r.run_id = ANY(v_runs)
       AND r.status IN ('completed', 'failed', 'cancelled')
       AND coalesce(r.completed_at, r.failed_at, r.cancelled_at) < p_older_than
     ORDER BY r.run_id
       FOR UPDATE SKIP LOCKED);
  IF cardinality(v_runs) = 0 THEN
    RETURN;
  END IF;

  -- Level 5: the messages of their tasks, per flow: in the queue those nobody is reading
  -- right now, then in the archive. (Every row lock of levels 1 to 3 is held already:
  -- deleting the rows below takes no new one.)
  FOR v_flow IN
    SELECT r.flow_slug,
           coalesce(array_agg(t.message_id ORDER BY t.message_id)
                      FILTER (WHERE t.message_id IS NOT NULL), '{}') AS msg_ids,
           coalesce(array_agg(DISTINCT r.run_id::text) FILTER (WHERE r.retry_count > 0), '{}')
             AS run_ids
      FROM pgflow.runs r
      LEFT JOIN pgflow.step_tasks t ON t.run_id = r.run_id
     WHERE r.run_id = ANY(v_runs)
     GROUP BY r.flow_slug
     ORDER BY r.flow_slug
  LOOP
    IF cardinality(v_flow.msg_ids) > 0
       AND pg_catalog.to_regclass(format('pgmq.%I', 'q_' || lower(v_flow.flow_slug))) IS NOT NULL THEN
      EXECUTE format(
        'SELECT array_agg(q.msg_id ORDER BY q.msg_id) FROM ('
        '  SELECT m.msg_id FROM pgmq.%I m WHERE m.msg_id = ANY($1)'
        '   ORDER BY m.msg_id FOR UPDATE SKIP LOCKED) q',
        'q_' || lower(v_flow.flow_slug))
        INTO v_free
        USING v_flow.msg_ids;
      IF cardinality(v_free) > 0 THEN
        EXECUTE format('DELETE FROM pgmq.%I m WHERE m.msg_id = ANY($1)',
                       'q_' || lower(v_flow.flow_slug))
          USING v_free;
        GET DIAGNOSTICS v_count = ROW_COUNT;
        messages_deleted := messages_deleted + v_count;
      END IF;
    END IF;
    IF pg_catalog.to_regclass(format('pgmq.%I', 'a_' || lower(v_flow.flow_slug))) IS NOT NULL THEN
      IF cardinality(v_flow.msg_ids) > 0 THEN
        EXECUTE format('DELETE FROM pgmq.%I a WHERE a.msg_id = ANY($1)',
                       'a_' || lower(v_flow.flow_slug))
          USING v_flow.msg_ids;
        GET DIAGNOSTICS v_count = ROW_COUNT;
        messages_deleted := messages_deleted + v_count;
      END IF;
      -- Messages from before a retry: no task names them any more.
      IF cardinality(v_flow.run_ids) > 0 THEN
        EXECUTE format('DELETE FROM pgmq.%I a WHERE (a.message->>''run_id'') = ANY($1)',
                       'a_' || lower(v_flow.flow_slug))
          USING v_flow.run_ids;
        GET DIAGNOSTICS v_count = ROW_COUNT;
        messages_deleted := messages_deleted + v_count;
      END IF;
    END IF;
  END LOOP;

  -- The rows, children first (attempts and run_retries cascade).
  DELETE FROM pgflow.step_tasks t WHERE t.run_id = ANY(v_runs);
  GET DIAGNOSTICS v_count = ROW_COUNT;
  tasks_deleted := v_count;
  DELETE FROM pgflow.step_states ss WHERE ss.run_id = ANY(v_runs);
  DELETE FROM pgflow.runs r WHERE r.run_id = ANY(v_runs);
  GET DIAGNOSTICS v_count = ROW_COUNT;
  runs_deleted := v_count;
END;
$$;

-- Prunes up to max_runs runs that ended before older_than, oldest first (see WHAT A RUN
-- TAKES WITH IT). Returns how many runs, tasks and messages (queue and archive) it
-- deleted: call it again, each call in a transaction of its own and with the same
-- older_than, until it deletes no run.
CREATE FUNCTION pgflow.prune_runs(
  older_than timestamptz, max_runs integer DEFAULT 1000,
  OUT runs_deleted integer, OUT tasks_deleted integer, OUT messages_deleted integer
)
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
  IF prune_runs.older_than IS NULL THEN
    RAISE EXCEPTION 'older_than must be a time (got NULL)'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF prune_runs.max_runs IS NULL OR prune_runs.max_runs < 1 THEN
    RAISE EXCEPTION 'max_runs must be at least 1 (got %)', prune_runs.max_runs
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  SELECT p.runs_deleted, p.tasks_deleted, p.messages_deleted
    INTO prune_runs.runs_deleted, prune_runs.tasks_deleted, prune_runs.messages_deleted
    FROM pgflow._prune_runs(ARRAY(
           SELECT r.run_id
             FROM pgflow.runs r
            WHERE r.status IN ('completed', 'failed', 'cancelled')
              AND coalesce(r.completed_at, r.failed_at, r.cancelled_at) < prune_runs.older_than
            ORDER BY coalesce(r.completed_at, r.failed_at, r.cancelled_at), r.run_id
            LIMIT prune_runs.max_runs),
         prune_runs.older_than) p;
END;
$$;

-- -------------------------------------------------------------------------------------
-- Workers
-- -------------------------------------------------------------------------------------

-- Deletes up to max_workers workers whose last heartbeat is before older_than and that no
-- started task names as its last worker. Returns how many: call it again until it returns
-- less than max_workers. Tasks that named a deleted worker get last_worker_id NULL (the
-- foreign key's ON DELETE SET NULL), at the cost of one scan of step_tasks per worker.
CREATE FUNCTION pgflow.prune_workers(older_than timestamptz, max_workers integer DEFAULT 100)
RETURNS integer
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_count integer;
BEGIN
  IF prune_workers.older_than IS NULL THEN
    RAISE EXCEPTION 'older_than must be a time (got NULL)'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF prune_workers.max_workers IS NULL OR prune_workers.max_workers < 1 THEN
    RAISE EXCEPTION 'max_workers must be at least 1 (got %)', prune_workers.max_workers
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  DELETE FROM pgflow.workers w
   WHERE w.worker_id IN (
           SELECT c.worker_id
             FROM pgflow.workers c
            WHERE c.last_heartbeat_at < prune_workers.older_than
              AND NOT EXISTS (SELECT 1 FROM pgflow.step_tasks t
                               WHERE t.last_worker_id = c.worker_id
                                 AND t.status = 'started')
            ORDER BY c.last_heartbeat_at, c.worker_id
            LIMIT prune_workers.max_workers
              FOR UPDATE SKIP LOCKED);
  GET DIAGNOSTICS v_count = ROW_COUNT;
  RETURN v_count;
END;
$$;

-- -------------------------------------------------------------------------------------
-- Preview
-- -------------------------------------------------------------------------------------

-- What prune_runs and prune_workers would delete with this older_than, counted without
-- deleting or locking anything: runs, tasks, messages (queue and archive), workers.
-- Rows that a concurrent transaction holds at prune time are passed over then, so the
-- prune can delete less than the preview counted, never more (for the same older_than
-- and no run ending meanwhile).
CREATE FUNCTION pgflow.prune_preview(
  older_than timestamptz,
  OUT runs bigint, OUT tasks bigint, OUT messages bigint, OUT workers bigint
)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_flow  record;
  v_count bigint;
BEGIN
  IF prune_preview.older_than IS NULL THEN
    RAISE EXCEPTION 'older_than must be a time (got NULL)'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  SELECT count(*) INTO prune_preview.runs
    FROM pgflow.runs r
   WHERE r.status IN ('completed', 'failed', 'cancelled')
     AND coalesce(r.completed_at, r.failed_at, r.cancelled_at) < prune_preview.older_than;
  SELECT count(*) INTO prune_preview.tasks
    FROM pgflow.runs r
    JOIN pgflow.step_tasks t ON t.run_id = r.run_id
   WHERE r.status IN ('completed', 'failed', 'cancelled')
     AND coalesce(r.completed_at, r.failed_at, r.cancelled_at) < prune_preview.older_than;
  prune_preview.messages := 0;
  FOR v_flow IN
    SELECT r.flow_slug,
           coalesce(array_agg(t.message_id) FILTER (WHERE t.message_id IS NOT NULL), '{}')
             AS msg_ids,
           coalesce(array_agg(DISTINCT r.run_id::text) FILTER (WHERE r.retry_count > 0), '{}')
             AS run_ids
      FROM pgflow.runs r
      LEFT JOIN pgflow.step_tasks t ON t.run_id = r.run_id
     WHERE r.status IN ('completed', 'failed', 'cancelled')
       AND coalesce(r.completed_at, r.failed_at, r.cancelled_at) < prune_preview.older_than
     GROUP BY r.flow_slug
     ORDER BY r.flow_slug
  LOOP
    IF pg_catalog.to_regclass(format('pgmq.%I', 'q_' || lower(v_flow.flow_slug))) IS NOT NULL THEN
      EXECUTE format('SELECT count(*) FROM pgmq.%I m WHERE m.msg_id = ANY($1)',
                     'q_' || lower(v_flow.flow_slug))
        INTO v_count USING v_flow.msg_ids;
      prune_preview.messages := prune_preview.messages + v_count;
    END IF;
    IF pg_catalog.to_regclass(format('pgmq.%I', 'a_' || lower(v_flow.flow_slug))) IS NOT NULL THEN
      EXECUTE format('SELECT count(*) FROM pgmq.%I a WHERE a.msg_id = ANY($1)'
                     ' OR (a.message->>''run_id'') = ANY($2)',
                     'a_' || lower(v_flow.flow_slug))
        INTO v_count USING v_flow.msg_ids, v_flow.run_ids;
      prune_preview.messages := prune_preview.messages + v_count;
    END IF;
  END LOOP;
  SELECT count(*) INTO prune_preview.workers
    FROM pgflow.workers c
   WHERE c.last_heartbeat_at < prune_preview.older_than
     AND NOT EXISTS (SELECT 1 FROM pgflow.step_tasks t
                      WHERE t.last_worker_id = c.worker_id
                        AND t.status = 'started');
END;
$$;

-- -------------------------------------------------------------------------------------
-- The documented one-call form
-- -------------------------------------------------------------------------------------

-- pgflow's prune_data_older_than: everything prune_runs and prune_workers delete for the
-- cutoff now() - retention_interval, in this one call and so in one transaction (see
-- BATCHES above). A negative interval is refused.
CREATE FUNCTION pgflow.prune_data_older_than(retention_interval interval)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_cutoff  timestamptz;
  v_batch   record;
  v_runs    bigint := 0;
  v_tasks   bigint := 0;
  v_msgs    bigint := 0;
  v_workers bigint := 0;
  v_count   integer;
BEGIN
  IF prune_data_older_than.retention_interval IS NULL
     OR prune_data_older_than.retention_interval < interval '0' THEN
    RAISE EXCEPTION 'retention_interval must be at least 0 (got %)',
      coalesce(prune_data_older_than.retention_interval::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  v_cutoff := now() - prune_data_older_than.retention_interval;
  LOOP
    SELECT * INTO v_batch FROM pgflow.prune_runs(v_cutoff, 1000);
    EXIT WHEN v_batch.runs_deleted = 0;
    v_runs := v_runs + v_batch.runs_deleted;
    v_tasks := v_tasks + v_batch.tasks_deleted;
    v_msgs := v_msgs + v_batch.messages_deleted;
  END LOOP;
  LOOP
    v_count := pgflow.prune_workers(v_cutoff, 100);
    v_workers := v_workers + v_count;
    EXIT WHEN v_count < 100;
  END LOOP;
  RAISE LOG 'pgflow: pruned what ended before %: % runs, % tasks, % messages, % workers',
    v_cutoff, v_runs, v_tasks, v_msgs, v_workers;
END;
$$;

-- -------------------------------------------------------------------------------------
-- Privileges: the owner's until granted (docs/security.md)
-- -------------------------------------------------------------------------------------

REVOKE EXECUTE ON FUNCTION
  pgflow._prune_runs(uuid[], timestamptz),
  pgflow.prune_runs(timestamptz, integer),
  pgflow.prune_workers(timestamptz, integer),
  pgflow.prune_preview(timestamptz),
  pgflow.prune_data_older_than(interval)
  FROM public;
