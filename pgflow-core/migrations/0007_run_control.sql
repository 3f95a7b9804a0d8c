-- =====================================================================================
-- pgflow engine, migration 0007: run control. Cancel a run, retry or resume a failed or
-- cancelled one, and retry policy a handler or a definition controls.
--
-- No pgflow version has these; the names follow the engine's style and everything is
-- additive to the 0.8.1 surface (docs/sql-api.md, "Run control").
--
-- STATES
-- ------
--   runs.status        + 'cancelled'   (cancelled_at set exactly then)
--   step_states.status + 'cancelled'   (steps that were 'started'; 'created' ones stay)
--   step_tasks.status  + 'cancelled'   (tasks that were 'queued' or 'started')
-- A cancelled task is neither queued nor started, so every report path (complete_task(s),
-- fail_task in all forms) and start_tasks already pass it over: a late report of a
-- cancelled run changes nothing. runs.retry_count counts the retries of a run.
--
-- CANCEL
-- ------
-- _cancel_runs takes its locks in 0001's order for the whole batch: the runs' queued and
-- started tasks, their step states, the runs; then the messages (level 5). A worker's
-- read (_read_and_start) holds a message before it locks its task, so the messages are
-- taken with SKIP LOCKED: one being read right now is left to that reader, which finds
-- its task cancelled and archives it (_drop_dead_messages below). Waiting for it instead
-- would close a cycle (we hold its task, it holds the message).
--
-- RETRY
-- -----
-- _retry_runs, same lock order: every task of the runs that is not completed, their step
-- states, the runs. Each step that is started, failed or cancelled starts again: its
-- unfinished tasks go back to 'queued' with attempts_count 0 and a new message; completed
-- tasks keep their outputs and never run again; steps still 'created' wait for their
-- dependencies as before. A report of an attempt from before the retry names an attempt
-- the task no longer has (or a task that is not started), so it is ignored. What the run
-- looked like before is kept in pgflow_ext.run_retries; the failed attempts of before and
-- after the retry stay apart in pgflow_ext.step_task_attempts (its new run_retry column).
--
-- RETRY POLICY
-- ------------
-- fail_task gains an eight-argument form whose last argument is the handler's own delay
-- before the next attempt (seconds). flows and steps gain opt_max_delay (a cap on the
-- exponential backoff) and opt_jitter ("equal jitter": uniform in [ceil(d/2), d]), set by
-- set_retry_policy. NULL and false, the defaults, keep 0.8.1's delays exactly.
-- =====================================================================================

-- -------------------------------------------------------------------------------------
-- States
-- -------------------------------------------------------------------------------------

ALTER TABLE pgflow.runs
  ADD COLUMN cancelled_at timestamptz,
  ADD COLUMN retry_count integer NOT NULL DEFAULT 0,
  DROP CONSTRAINT status_is_valid,
  ADD CONSTRAINT status_is_valid CHECK (status IN ('started', 'completed', 'failed', 'cancelled')),
  ADD CONSTRAINT cancelled_at_when_cancelled CHECK ((status = 'cancelled') = (cancelled_at IS NOT NULL)),
  ADD CONSTRAINT cancelled_at_is_after_started_at CHECK (cancelled_at IS NULL OR cancelled_at >= started_at),
  ADD CONSTRAINT retry_count_nonnegative CHECK (retry_count >= 0);

ALTER TABLE pgflow.step_states
  DROP CONSTRAINT status_is_valid,
  ADD CONSTRAINT status_is_valid CHECK (status IN ('created', 'started', 'completed', 'failed', 'cancelled'));

ALTER TABLE pgflow.step_tasks
  DROP CONSTRAINT valid_status,
  ADD CONSTRAINT valid_status CHECK (status IN ('queued', 'started', 'completed', 'failed', 'cancelled'));

ALTER TABLE pgflow.flows
  ADD COLUMN opt_max_delay integer,
  ADD COLUMN opt_jitter boolean NOT NULL DEFAULT false,
  ADD CONSTRAINT opt_max_delay_is_nonnegative CHECK (opt_max_delay IS NULL OR opt_max_delay >= 0);

ALTER TABLE pgflow.steps
  ADD COLUMN opt_max_delay integer,
  ADD COLUMN opt_jitter boolean,
  ADD CONSTRAINT opt_max_delay_is_nonnegative CHECK (opt_max_delay IS NULL OR opt_max_delay >= 0);

-- -------------------------------------------------------------------------------------
-- History
-- -------------------------------------------------------------------------------------

-- One row per retry: how the run had ended before it.
CREATE TABLE pgflow_ext.run_retries (
  run_id           uuid        NOT NULL,
  retry_number     integer     NOT NULL,
  retried_at       timestamptz NOT NULL DEFAULT now(),
  previous_status  text        NOT NULL,
  ended_at         timestamptz NOT NULL,
  failed_step_slug text,
  error_message    text,
  CONSTRAINT run_retries_pkey PRIMARY KEY (run_id, retry_number),
  CONSTRAINT run_retries_run_id_fkey FOREIGN KEY (run_id)
    REFERENCES pgflow.runs (run_id) ON DELETE CASCADE,
  CONSTRAINT previous_status_is_valid CHECK (previous_status IN ('failed', 'cancelled')),
  CONSTRAINT retry_number_is_positive CHECK (retry_number >= 1)
);

REVOKE ALL ON TABLE pgflow_ext.run_retries FROM public;

ALTER TABLE pgflow_ext.step_task_attempts
  ADD COLUMN run_retry integer NOT NULL DEFAULT 0,
  DROP CONSTRAINT step_task_attempts_pkey,
  ADD CONSTRAINT step_task_attempts_pkey
    PRIMARY KEY (run_id, step_slug, task_index, run_retry, attempt);

-- 0006's trigger function, recording the run's retry count with the attempt: a failure
-- is rare next to a completion, and one primary-key read of the run costs it little.
CREATE OR REPLACE FUNCTION pgflow_private._record_failed_attempt()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
  INSERT INTO pgflow_ext.step_task_attempts
    (run_id, step_slug, task_index, attempt, error_message, failed_at, last_worker_id,
     run_retry)
  VALUES
    (NEW.run_id, NEW.step_slug, NEW.task_index, NEW.attempts_count, NEW.error_message,
     coalesce(NEW.failed_at, now()), NEW.last_worker_id,
     coalesce((SELECT r.retry_count FROM pgflow.runs r WHERE r.run_id = NEW.run_id), 0))
  ON CONFLICT (run_id, step_slug, task_index, run_retry, attempt) DO NOTHING;
  RETURN NULL;
END;
$$;

-- -------------------------------------------------------------------------------------
-- Retry policy
-- -------------------------------------------------------------------------------------

-- The delay before the next attempt: 0.8.1's calculate_retry_delay, capped at
-- p_max_delay when given, then with equal jitter when asked (uniform in [ceil(d/2), d],
-- so a delay never collapses to nothing and keeps its order of magnitude).
CREATE FUNCTION pgflow._retry_delay(
  p_base_delay integer, p_attempts_count integer, p_max_delay integer, p_jitter boolean
)
RETURNS integer
LANGUAGE sql
VOLATILE
SET search_path = ''
AS $$
  SELECT CASE
           WHEN coalesce(p_jitter, false) AND d.capped > 1 THEN
             least(d.capped, ceil(d.capped / 2.0 + random() * (d.capped / 2.0))::bigint)::integer
           ELSE d.capped
         END
    FROM (SELECT CASE
                   WHEN p_max_delay IS NULL THEN raw.delay
                   ELSE least(raw.delay, p_max_delay)
                 END AS capped
            FROM (SELECT pgflow.calculate_retry_delay(p_base_delay, p_attempts_count) AS delay) raw
         ) d
$$;

-- Sets the retry policy of flow flow_slug (step_slug NULL) or of one of its steps.
-- max_delay NULL: no cap; a step's jitter NULL: the flow's.
CREATE FUNCTION pgflow.set_retry_policy(
  flow_slug text, step_slug text, max_delay integer, jitter boolean
)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
BEGIN
  IF set_retry_policy.max_delay < 0 THEN
    RAISE EXCEPTION 'max_delay must be at least 0 seconds (got %)', set_retry_policy.max_delay
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF set_retry_policy.step_slug IS NULL THEN
    UPDATE pgflow.flows f
       SET opt_max_delay = set_retry_policy.max_delay,
           opt_jitter = coalesce(set_retry_policy.jitter, false)
     WHERE f.flow_slug = set_retry_policy.flow_slug;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'flow % not found', set_retry_policy.flow_slug
        USING ERRCODE = 'no_data_found';
    END IF;
  ELSE
    UPDATE pgflow.steps s
       SET opt_max_delay = set_retry_policy.max_delay,
           opt_jitter = set_retry_policy.jitter
     WHERE s.flow_slug = set_retry_policy.flow_slug
       AND s.step_slug = set_retry_policy.step_slug;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'step % of flow % not found', set_retry_policy.step_slug,
        set_retry_policy.flow_slug
        USING ERRCODE = 'no_data_found';
    END IF;
  END IF;
END;
$$;

-- 0002's fail_task with one more argument, retry_delay: the handler's own delay before the
-- next attempt, in seconds, used instead of the computed backoff (and not capped by it).
-- An overload without defaults beside the seven-argument form, which keeps its callers
-- and now comes here: a default on the new argument would make calls of five to seven
-- arguments ambiguous between the two.
CREATE FUNCTION pgflow_private.fail_task(
  run_id        uuid,
  step_slug     text,
  task_index    integer,
  error_message text,
  attempt       integer,
  worker_id     uuid,
  permanent     boolean,
  retry_delay   integer
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
  v_max_delay    integer;
  v_jitter       boolean;
  v_msgs         bigint[];
BEGIN
  IF fail_task.retry_delay < 0 THEN
    RAISE EXCEPTION 'retry_delay must be at least 0 seconds (got %)', fail_task.retry_delay
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

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
           coalesce(s.opt_base_delay, f.opt_base_delay),
           coalesce(s.opt_max_delay, f.opt_max_delay),
           coalesce(s.opt_jitter, f.opt_jitter)
      INTO v_max_attempts, v_base_delay, v_max_delay, v_jitter
      FROM pgflow.steps s
      JOIN pgflow.flows f ON f.flow_slug = s.flow_slug
     WHERE s.flow_slug = v_flow_slug
       AND s.step_slug = fail_task.step_slug;

    IF v_task.attempts_count < v_max_attempts AND NOT coalesce(fail_task.permanent, false) THEN
      -- Retry: back to queued; the message reappears after the delay. No step or run
      -- lock needed, nothing else changes.
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
                            coalesce(fail_task.retry_delay,
                                     pgflow._retry_delay(v_base_delay, v_task.attempts_count,
                                                         v_max_delay, v_jitter)));
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

CREATE OR REPLACE FUNCTION pgflow_private.fail_task(
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
AS $$
BEGIN
  RETURN QUERY
  SELECT * FROM pgflow_private.fail_task(fail_task.run_id, fail_task.step_slug,
                                         fail_task.task_index, fail_task.error_message,
                                         fail_task.attempt, fail_task.worker_id,
                                         fail_task.permanent, NULL::integer);
END;
$$;

-- The checking wrapper of the eight-argument form, as 0004's of the seven-argument one.
CREATE FUNCTION pgflow.fail_task(
  run_id        uuid,
  step_slug     text,
  task_index    integer,
  error_message text,
  attempt       integer,
  worker_id     uuid,
  permanent     boolean,
  retry_delay   integer
)
RETURNS SETOF pgflow.step_tasks
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
  PERFORM pgflow._authorize_tasks(ARRAY[fail_task.run_id], ARRAY[fail_task.step_slug],
                                  ARRAY[fail_task.task_index]);
  RETURN QUERY
  SELECT * FROM pgflow_private.fail_task(fail_task.run_id, fail_task.step_slug,
                                         fail_task.task_index, fail_task.error_message,
                                         fail_task.attempt, fail_task.worker_id,
                                         fail_task.permanent, fail_task.retry_delay);
END;
$$;

-- -------------------------------------------------------------------------------------
-- Messages
-- -------------------------------------------------------------------------------------

-- What _start_ready_steps does to send: messages (with their visibility times) into flow
-- p_flow_slug's queue through its send function, else by the same statement as dynamic
-- SQL. Returns the new message ids in the order of p_messages.
CREATE FUNCTION pgflow._send_messages(p_flow_slug text, p_vts timestamptz[], p_messages jsonb[])
RETURNS bigint[]
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_send text := pgflow._queue_function('send', p_flow_slug);
  v_ids  bigint[];
BEGIN
  IF coalesce(cardinality(p_messages), 0) = 0 THEN
    RETURN '{}';
  END IF;
  IF v_send IS NOT NULL THEN
    EXECUTE format('SELECT pgflow.%I($1, $2)', v_send) INTO v_ids USING p_vts, p_messages;
  ELSE
    EXECUTE pgflow._send_statement('q_' || lower(p_flow_slug)) INTO v_ids USING p_vts, p_messages;
  END IF;
  RETURN v_ids;
END;
$$;

-- Archives the messages among p_msg_ids (of flow p_flow_slug's queue) that no task will
-- ever need: their task was cancelled, or no task names them (a retry gave the task a new
-- message). Returns them. Called where messages were read but started no task, which is
-- rare, so the common read pays nothing for it.
CREATE FUNCTION pgflow._drop_dead_messages(p_flow_slug text, p_msg_ids bigint[])
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
  v_dead bigint[];
BEGIN
  v_dead := ARRAY(
    SELECT m.id
      FROM unnest(p_msg_ids) AS m(id)
     WHERE m.id IS NOT NULL
       AND NOT EXISTS (
             SELECT 1
               FROM pgflow.step_tasks t
              WHERE t.message_id = m.id
                AND t.flow_slug = p_flow_slug
                AND t.status <> 'cancelled')
     ORDER BY m.id);
  IF cardinality(v_dead) > 0 THEN
    PERFORM pgflow._archive_messages(p_flow_slug, v_dead);
  END IF;
  RETURN v_dead;
END;
$$;

-- 0001's _read_and_start (moved to pgflow_private by 0004): messages that started no task
-- are archived when no task needs them (_drop_dead_messages), and get pgmq.read's
-- visibility otherwise, as before.
CREATE OR REPLACE FUNCTION pgflow_private._read_and_start(
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
  v_idle  bigint[];
BEGIN
  v_read := pgflow._queue_function('read', p_flow_slug);
  IF v_read IS NULL THEN
    -- A queue without its functions: pgmq's own read (a missing queue fails there with
    -- PostgreSQL's 42P01), and start_tasks sets the visibility as for any worker.
    v_ids := ARRAY(SELECT m.msg_id FROM pgmq.read(p_flow_slug, p_vt, p_qty) AS m ORDER BY m.msg_id);
    v_tasks := ARRAY(
      SELECT t FROM pgflow._start_tasks(p_flow_slug, v_ids, p_worker_id, true) AS t);
    IF cardinality(v_tasks) < cardinality(v_ids) THEN
      PERFORM pgflow._drop_dead_messages(p_flow_slug, ARRAY(
        SELECT i FROM unnest(v_ids) AS i EXCEPT SELECT t.msg_id FROM unnest(v_tasks) AS t));
    END IF;
    RETURN QUERY SELECT * FROM unnest(v_tasks);
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

  -- Rare: messages whose task did not start (a duplicate, a stray message, a cancelled
  -- task) are archived when dead, else get the visibility pgmq.read gives.
  IF cardinality(v_tasks) < cardinality(v_ids) THEN
    v_idle := ARRAY(SELECT i FROM unnest(v_ids) AS i
                    EXCEPT SELECT t.msg_id FROM unnest(v_tasks) AS t);
    v_idle := ARRAY(SELECT i FROM unnest(v_idle) AS i
                    EXCEPT SELECT d FROM unnest(pgflow._drop_dead_messages(p_flow_slug, v_idle)) AS d);
    EXECUTE format(
      'UPDATE pgmq.%I q SET vt = clock_timestamp() + make_interval(secs => $2)'
      ' WHERE q.msg_id = ANY($1)', 'q_' || lower(p_flow_slug))
      USING v_idle, p_vt;
  END IF;

  RETURN QUERY SELECT * FROM unnest(v_tasks);
END;
$$;

-- 0001's start_tasks (moved to pgflow_private by 0004), the path of workers that read
-- with pgmq.read: dead messages among those that started no task are archived.
CREATE OR REPLACE FUNCTION pgflow_private.start_tasks(flow_slug text, msg_ids bigint[], worker_id uuid)
RETURNS SETOF pgflow.step_task_record
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
ROWS 10
AS $$
DECLARE
  v_tasks pgflow._started_task[];
BEGIN
  v_tasks := ARRAY(
    SELECT t FROM pgflow._start_tasks(start_tasks.flow_slug, start_tasks.msg_ids,
                                      start_tasks.worker_id, true) AS t);
  IF cardinality(v_tasks) < coalesce(cardinality(start_tasks.msg_ids), 0) THEN
    PERFORM pgflow._drop_dead_messages(start_tasks.flow_slug, ARRAY(
      SELECT i FROM unnest(start_tasks.msg_ids) AS i
      EXCEPT SELECT t.msg_id FROM unnest(v_tasks) AS t));
  END IF;
  RETURN QUERY
  SELECT t.flow_slug, t.run_id, t.step_slug, t.input, t.msg_id, t.task_index
    FROM unnest(v_tasks) AS t;
END;
$$;

-- -------------------------------------------------------------------------------------
-- Cancel
-- -------------------------------------------------------------------------------------

-- Cancels those of the runs p_run_ids (all of flow p_flow_slug) that are started, in one
-- lock order for the batch (see CANCEL above). Returns the ids of the runs it cancelled.
CREATE FUNCTION pgflow._cancel_runs_once(p_flow_slug text, p_run_ids uuid[])
RETURNS uuid[]
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_runs  uuid[];
  v_msgs  bigint[];
  v_free  bigint[];
  v_steps jsonb[];
  v_at    timestamptz;
BEGIN
  -- Level 1, 2, 3: tasks, step states, runs, each in key order.
  PERFORM 1
     FROM pgflow.step_tasks t
    WHERE t.run_id = ANY(p_run_ids)
      AND t.status IN ('queued', 'started')
    ORDER BY t.run_id, t.step_slug, t.task_index
      FOR NO KEY UPDATE;
  PERFORM 1
     FROM pgflow.step_states ss
    WHERE ss.run_id = ANY(p_run_ids)
    ORDER BY ss.run_id, ss.step_slug
      FOR NO KEY UPDATE;
  PERFORM 1
     FROM pgflow.runs r
    WHERE r.run_id = ANY(p_run_ids)
    ORDER BY r.run_id
      FOR NO KEY UPDATE;
  -- Under the locks: only runs still started.
  v_runs := ARRAY(
    SELECT r.run_id FROM pgflow.runs r
     WHERE r.run_id = ANY(p_run_ids) AND r.flow_slug = p_flow_slug AND r.status = 'started'
     ORDER BY r.run_id);
  IF cardinality(v_runs) = 0 THEN
    RETURN v_runs;
  END IF;
  -- The time the locks were had, not the transaction's start (now()): a completion that
  -- committed while this waited for its task came before the cancel, and its completed_at
  -- (its own transaction's start) is then never later than the run's cancelled_at.
  v_at := clock_timestamp();

  WITH cancelled AS (
    UPDATE pgflow.step_tasks t
       SET status = 'cancelled'
     WHERE t.run_id = ANY(v_runs)
       AND t.status IN ('queued', 'started')
    RETURNING t.message_id
  )
  SELECT coalesce(array_agg(c.message_id ORDER BY c.message_id)
                    FILTER (WHERE c.message_id IS NOT NULL), '{}')
    INTO v_msgs
    FROM cancelled c;

  WITH cancelled AS (
    UPDATE pgflow.step_states ss
       SET status = 'cancelled'
     WHERE ss.run_id = ANY(v_runs)
       AND ss.status = 'started'
    RETURNING ss.run_id, ss.step_slug
  )
  SELECT coalesce(array_agg(jsonb_build_object(
           'event_type', 'step:cancelled',
           'run_id', c.run_id,
           'flow_slug', p_flow_slug,
           'step_slug', c.step_slug,
           'status', 'cancelled',
           'cancelled_at', v_at) ORDER BY c.run_id, c.step_slug), '{}')
    INTO v_steps
    FROM cancelled c;

  UPDATE pgflow.runs r
     SET status = 'cancelled',
         cancelled_at = v_at
   WHERE r.run_id = ANY(v_runs);

  -- Level 5: the messages nobody is reading right now (see CANCEL above).
  IF cardinality(v_msgs) > 0
     AND pg_catalog.to_regclass(format('pgmq.%I', 'q_' || lower(p_flow_slug))) IS NOT NULL THEN
    EXECUTE format(
      'SELECT array_agg(q.msg_id ORDER BY q.msg_id) FROM ('
      '  SELECT m.msg_id FROM pgmq.%I m WHERE m.msg_id = ANY($1)'
      '   ORDER BY m.msg_id FOR UPDATE SKIP LOCKED) q',
      'q_' || lower(p_flow_slug))
      INTO v_free
      USING v_msgs;
    PERFORM pgflow._archive_messages(p_flow_slug, v_free);
  END IF;

  PERFORM pgflow._emit_all(v_steps || ARRAY(
    SELECT jsonb_build_object(
             'event_type', 'run:cancelled',
             'run_id', r.run_id,
             'flow_slug', p_flow_slug,
             'status', 'cancelled',
             'cancelled_at', v_at)
      FROM unnest(v_runs) AS r(run_id)));

  -- Workers running the runs' tasks stop their handlers (EXTENSION: channel
  -- pgflow_cancel, payload the run id).
  PERFORM pg_notify('pgflow_cancel', r.run_id::text) FROM unnest(v_runs) AS r(run_id);

  RETURN v_runs;
END;
$$;

-- _cancel_runs_once, tried again when the deadlock detector chose it. A task created by a
-- completion that commits after the first lock statement is locked by the UPDATE, after the
-- runs; and workers' reads hold a message before its task. Rarely, a cycle closes; the
-- attempt runs in a subtransaction, so when this side is chosen all its locks go, the other
-- side goes on, and the cancel starts again.
CREATE FUNCTION pgflow._cancel_runs(p_flow_slug text, p_run_ids uuid[])
RETURNS uuid[]
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_try integer;
BEGIN
  FOR v_try IN 1 .. 5 LOOP
    BEGIN
      RETURN pgflow._cancel_runs_once(p_flow_slug, p_run_ids);
    EXCEPTION
      WHEN deadlock_detected THEN
        IF v_try = 5 THEN
          RAISE;
        END IF;
        PERFORM pg_sleep(0.01 * v_try);
    END;
  END LOOP;
END;
$$;

-- Cancels a started run: its queued and started tasks become cancelled and their messages
-- are archived, its started steps become cancelled, and the run ends as 'cancelled'.
-- Returns true when this call cancelled it, false (with a NOTICE) when it had already
-- ended.
CREATE FUNCTION pgflow.cancel_run(run_id uuid)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_flow_slug text;
  v_status    text;
BEGIN
  SELECT r.flow_slug INTO v_flow_slug FROM pgflow.runs r WHERE r.run_id = cancel_run.run_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'run % not found', cancel_run.run_id USING ERRCODE = 'no_data_found';
  END IF;
  IF cardinality(pgflow._cancel_runs(v_flow_slug, ARRAY[cancel_run.run_id])) = 1 THEN
    RETURN true;
  END IF;
  SELECT r.status INTO v_status FROM pgflow.runs r WHERE r.run_id = cancel_run.run_id;
  RAISE NOTICE 'run % is already %: nothing to cancel', cancel_run.run_id, v_status;
  RETURN false;
END;
$$;

-- Cancels up to max_runs started runs of a flow, oldest first (only those started before
-- started_before, when given). Returns how many it cancelled: call it again, each call in
-- a transaction of its own, until it returns less than max_runs.
CREATE FUNCTION pgflow.cancel_runs(
  flow_slug text, started_before timestamptz DEFAULT NULL, max_runs integer DEFAULT 1000
)
RETURNS integer
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
  IF cancel_runs.max_runs IS NULL OR cancel_runs.max_runs < 1 THEN
    RAISE EXCEPTION 'max_runs must be at least 1 (got %)', cancel_runs.max_runs
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pgflow.flows f WHERE f.flow_slug = cancel_runs.flow_slug) THEN
    RAISE EXCEPTION 'flow % not found', cancel_runs.flow_slug USING ERRCODE = 'no_data_found';
  END IF;
  RETURN cardinality(pgflow._cancel_runs(cancel_runs.flow_slug, ARRAY(
    SELECT r.run_id
      FROM pgflow.runs r
     WHERE r.flow_slug = cancel_runs.flow_slug
       AND r.status = 'started'
       AND (cancel_runs.started_before IS NULL OR r.started_at < cancel_runs.started_before)
     ORDER BY r.started_at, r.run_id
     LIMIT cancel_runs.max_runs)));
END;
$$;

-- -------------------------------------------------------------------------------------
-- Retry
-- -------------------------------------------------------------------------------------

-- Retries those of the runs p_run_ids (all of flow p_flow_slug) that are failed or
-- cancelled, in one lock order for the batch (see RETRY above). Returns the ids of the
-- runs it retried.
CREATE FUNCTION pgflow._retry_runs_once(p_flow_slug text, p_run_ids uuid[])
RETURNS uuid[]
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_runs     uuid[];
  v_now      timestamptz := clock_timestamp();
  v_task_run uuid[];
  v_task_stp text[];
  v_task_idx integer[];
  v_vts      timestamptz[];
  v_messages jsonb[];
  v_msg_ids  bigint[];
  v_events   jsonb[];
  v_stuck    record;
BEGIN
  -- Level 1, 2, 3: tasks, step states, runs, each in key order.
  PERFORM 1
     FROM pgflow.step_tasks t
    WHERE t.run_id = ANY(p_run_ids)
      AND t.status <> 'completed'
    ORDER BY t.run_id, t.step_slug, t.task_index
      FOR NO KEY UPDATE;
  PERFORM 1
     FROM pgflow.step_states ss
    WHERE ss.run_id = ANY(p_run_ids)
    ORDER BY ss.run_id, ss.step_slug
      FOR NO KEY UPDATE;
  PERFORM 1
     FROM pgflow.runs r
    WHERE r.run_id = ANY(p_run_ids)
    ORDER BY r.run_id
      FOR NO KEY UPDATE;
  v_runs := ARRAY(
    SELECT r.run_id FROM pgflow.runs r
     WHERE r.run_id = ANY(p_run_ids) AND r.flow_slug = p_flow_slug
       AND r.status IN ('failed', 'cancelled')
     ORDER BY r.run_id);
  IF cardinality(v_runs) = 0 THEN
    RETURN v_runs;
  END IF;

  -- A step to start again always has a task to run: a failed or cancelled step has the
  -- task that failed or was cancelled, a started one those not completed yet (a step
  -- whose last task completes completes with it).
  SELECT ss.run_id, ss.step_slug INTO v_stuck
    FROM pgflow.step_states ss
   WHERE ss.run_id = ANY(v_runs)
     AND ss.status IN ('started', 'failed', 'cancelled')
     AND NOT EXISTS (SELECT 1 FROM pgflow.step_tasks t
                      WHERE t.run_id = ss.run_id AND t.step_slug = ss.step_slug
                        AND t.status <> 'completed')
   LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'run % cannot be retried: step % is unfinished but has no unfinished task',
      v_stuck.run_id, v_stuck.step_slug
      USING ERRCODE = 'internal_error';
  END IF;

  INSERT INTO pgflow_ext.run_retries
    (run_id, retry_number, retried_at, previous_status, ended_at, failed_step_slug,
     error_message)
  SELECT r.run_id, r.retry_count + 1, now(), r.status,
         coalesce(r.failed_at, r.cancelled_at), fs.step_slug, fs.error_message
    FROM pgflow.runs r
    LEFT JOIN LATERAL (
      SELECT ss.step_slug, ss.error_message
        FROM pgflow.step_states ss
       WHERE ss.run_id = r.run_id AND ss.status = 'failed'
       ORDER BY ss.failed_at, ss.step_slug
       LIMIT 1) fs ON true
   WHERE r.run_id = ANY(v_runs);

  -- The tasks to run again, in (run, step, task) order, with their new messages.
  SELECT array_agg(x.run_id), array_agg(x.step_slug), array_agg(x.task_index),
         array_agg(x.vt), array_agg(x.message)
    INTO v_task_run, v_task_stp, v_task_idx, v_vts, v_messages
    FROM (
      SELECT t.run_id, t.step_slug, t.task_index,
             v_now + make_interval(secs => coalesce(s.opt_start_delay, 0)) AS vt,
             jsonb_build_object('flow_slug', p_flow_slug, 'run_id', t.run_id,
                                'step_slug', t.step_slug, 'task_index', t.task_index) AS message
        FROM pgflow.step_tasks t
        JOIN pgflow.steps s ON s.flow_slug = t.flow_slug AND s.step_slug = t.step_slug
       WHERE t.run_id = ANY(v_runs)
         AND t.status <> 'completed'
       ORDER BY t.run_id, t.step_slug, t.task_index
    ) x;

  v_msg_ids := pgflow._send_messages(p_flow_slug, v_vts, v_messages);

  UPDATE pgflow.step_tasks t
     SET status = 'queued',
         attempts_count = 0,
         error_message = NULL,
         output = NULL,
         -- queued_at stays: a worker whose transaction began before this retry committed
         -- may start the task, and its started_at (its now()) must not precede queued_at
         -- (started_at_is_after_queued_at would refuse its whole batch).
         started_at = NULL,
         completed_at = NULL,
         failed_at = NULL,
         message_id = n.msg_id
    FROM unnest(v_task_run, v_task_stp, v_task_idx, v_msg_ids)
         AS n(run_id, step_slug, task_index, msg_id)
   WHERE t.run_id = n.run_id
     AND t.step_slug = n.step_slug
     AND t.task_index = n.task_index;

  WITH restarted AS (
    UPDATE pgflow.step_states ss
       SET status = 'started',
           started_at = now(),
           failed_at = NULL,
           error_message = NULL,
           remaining_tasks = (SELECT count(*)::integer FROM pgflow.step_tasks t
                               WHERE t.run_id = ss.run_id AND t.step_slug = ss.step_slug
                                 AND t.status <> 'completed')
     WHERE ss.run_id = ANY(v_runs)
       AND ss.status IN ('started', 'failed', 'cancelled')
    RETURNING ss.run_id, ss.step_slug, ss.remaining_tasks, ss.remaining_deps, ss.started_at
  )
  SELECT coalesce(array_agg(jsonb_build_object(
           'event_type', 'step:started',
           'run_id', x.run_id,
           'flow_slug', p_flow_slug,
           'step_slug', x.step_slug,
           'status', 'started',
           'started_at', x.started_at,
           'remaining_tasks', x.remaining_tasks,
           'remaining_deps', x.remaining_deps) ORDER BY x.run_id, x.step_slug), '{}')
    INTO v_events
    FROM restarted x;

  WITH retried AS (
    UPDATE pgflow.runs r
       SET status = 'started',
           failed_at = NULL,
           cancelled_at = NULL,
           retry_count = r.retry_count + 1,
           remaining_steps = (SELECT count(*)::integer FROM pgflow.step_states ss
                               WHERE ss.run_id = r.run_id AND ss.status <> 'completed')
     WHERE r.run_id = ANY(v_runs)
    RETURNING r.run_id, r.retry_count
  )
  SELECT ARRAY(
           SELECT jsonb_build_object(
                    'event_type', 'run:retried',
                    'run_id', x.run_id,
                    'flow_slug', p_flow_slug,
                    'status', 'started',
                    'retry_count', x.retry_count,
                    'retried_at', now())
             FROM retried x ORDER BY x.run_id) || v_events
    INTO v_events;

  PERFORM pgflow._emit_all(v_events);
  PERFORM pg_notify('pgflow_tasks', p_flow_slug);

  RETURN v_runs;
END;
$$;

-- _retry_runs_once, tried again when the deadlock detector chose it (as _cancel_runs).
CREATE FUNCTION pgflow._retry_runs(p_flow_slug text, p_run_ids uuid[])
RETURNS uuid[]
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_try integer;
BEGIN
  FOR v_try IN 1 .. 5 LOOP
    BEGIN
      RETURN pgflow._retry_runs_once(p_flow_slug, p_run_ids);
    EXCEPTION
      WHEN deadlock_detected THEN
        IF v_try = 5 THEN
          RAISE;
        END IF;
        PERFORM pg_sleep(0.01 * v_try);
    END;
  END LOOP;
END;
$$;

-- Takes a failed or cancelled run back to 'started' (see RETRY above). Returns its new
-- retry_count. Refused for a run that is started or completed.
CREATE FUNCTION pgflow.retry_run(run_id uuid)
RETURNS integer
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_run pgflow.runs;
BEGIN
  SELECT * INTO v_run FROM pgflow.runs r WHERE r.run_id = retry_run.run_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'run % not found', retry_run.run_id USING ERRCODE = 'no_data_found';
  END IF;
  IF v_run.status IN ('failed', 'cancelled') THEN
    IF retry_run.run_id = ANY(pgflow._retry_runs(v_run.flow_slug, ARRAY[retry_run.run_id])) THEN
      SELECT r.retry_count INTO v_run.retry_count FROM pgflow.runs r WHERE r.run_id = retry_run.run_id;
      RETURN v_run.retry_count;
    END IF;
    -- Another caller retried it while this one waited for its locks.
    SELECT * INTO v_run FROM pgflow.runs r WHERE r.run_id = retry_run.run_id;
  END IF;
  RAISE EXCEPTION 'run % is %: only a failed or cancelled run can be retried',
    retry_run.run_id, v_run.status
    USING ERRCODE = 'object_not_in_prerequisite_state';
END;
$$;

-- Retries up to max_runs failed runs of a flow whose failed_at lies in
-- [failed_since, failed_before) (either end open when NULL), oldest first. Returns how many
-- it retried: call it again, each call in a transaction of its own and with the same
-- failed_before, until it returns less than max_runs.
CREATE FUNCTION pgflow.retry_runs(
  flow_slug text, failed_since timestamptz DEFAULT NULL, failed_before timestamptz DEFAULT NULL,
  max_runs integer DEFAULT 100
)
RETURNS integer
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
  IF retry_runs.max_runs IS NULL OR retry_runs.max_runs < 1 THEN
    RAISE EXCEPTION 'max_runs must be at least 1 (got %)', retry_runs.max_runs
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pgflow.flows f WHERE f.flow_slug = retry_runs.flow_slug) THEN
    RAISE EXCEPTION 'flow % not found', retry_runs.flow_slug USING ERRCODE = 'no_data_found';
  END IF;
  RETURN cardinality(pgflow._retry_runs(retry_runs.flow_slug, ARRAY(
    SELECT r.run_id
      FROM pgflow.runs r
     WHERE r.flow_slug = retry_runs.flow_slug
       AND r.status = 'failed'
       AND (retry_runs.failed_since IS NULL OR r.failed_at >= retry_runs.failed_since)
       AND (retry_runs.failed_before IS NULL OR r.failed_at < retry_runs.failed_before)
     ORDER BY r.failed_at, r.run_id
     LIMIT retry_runs.max_runs)));
END;
$$;

-- -------------------------------------------------------------------------------------
-- Privileges: the owner's until granted (docs/security.md)
-- -------------------------------------------------------------------------------------

REVOKE EXECUTE ON FUNCTION
  pgflow._retry_delay(integer, integer, integer, boolean),
  pgflow.set_retry_policy(text, text, integer, boolean),
  pgflow_private.fail_task(uuid, text, integer, text, integer, uuid, boolean, integer),
  pgflow.fail_task(uuid, text, integer, text, integer, uuid, boolean, integer),
  pgflow._send_messages(text, timestamptz[], jsonb[]),
  pgflow._drop_dead_messages(text, bigint[]),
  pgflow._cancel_runs_once(text, uuid[]),
  pgflow._cancel_runs(text, uuid[]),
  pgflow.cancel_run(uuid),
  pgflow.cancel_runs(text, timestamptz, integer),
  pgflow._retry_runs_once(text, uuid[]),
  pgflow._retry_runs(text, uuid[]),
  pgflow.retry_run(uuid),
  pgflow.retry_runs(text, timestamptz, timestamptz, integer)
  FROM public;

-- Whoever may fail a task with the seven-argument form may with the eight-argument one:
-- workers granted before this migration keep reporting.
DO $$
DECLARE
  v_grantee name;
BEGIN
  FOR v_grantee IN
    SELECT DISTINCT pg_catalog.pg_get_userbyid(a.grantee)
      FROM pg_catalog.pg_proc p
     CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) a
     WHERE p.oid = 'pgflow.fail_task(uuid, text, integer, text, integer, uuid, boolean)'::regprocedure
       AND a.privilege_type = 'EXECUTE'
       AND a.grantee <> 0
       AND a.grantee <> p.proowner
  LOOP
    EXECUTE format('GRANT EXECUTE ON FUNCTION '
                   'pgflow.fail_task(uuid, text, integer, text, integer, uuid, boolean, integer) TO %I',
                   v_grantee);
  END LOOP;
END;
$$;
