-- =====================================================================================
-- pgflow engine, migration 0014: concurrency limits and rate limits of steps (issue 22).
--
-- No pgflow version has these; the names follow the engine's style and everything is
-- additive: no table of schema pgflow changes, no status is added, and a flow without
-- limits starts its tasks exactly as before (docs/sql-api.md, "Limits"; docs/limits.md).
--
-- WHAT A LIMIT IS
-- ---------------
-- A step may have, in pgflow_ext.step_limits:
--   * a concurrency limit: at most max_concurrent of its tasks are 'started' at once,
--     across every worker; with concurrency_key, at most that many per value of that
--     top-level key of the run input (per tenant, per customer);
--   * a rate limit: at most rate_max_starts of its tasks start per rate_period, in fixed
--     windows aligned on the epoch (a period of 1 second: each second of the clock); with
--     rate_key, per value of that key.
-- A started task holds its slot until it is no longer 'started' (completed, failed,
-- retried, cancelled) or until its timeout has passed since it started: a task whose
-- worker died frees its slot after its timeout, when the engine takes its attempt as lost
-- (0010, STALLED TASKS). A handler that runs past its timeout therefore no longer counts:
-- its task is started again anyway at timeout + 2 seconds.
-- Key values: a run input that is not an object, or lacks the key, puts the task in the
-- "absent" bucket; any other value (JSON null included) is its own bucket, named by the
-- md5 of its JSON text, so a huge or hostile value costs 32 bytes.
--
-- WHERE IT IS ENFORCED
-- --------------------
-- Where messages become started tasks: pgflow_private._read_and_start (the Rust worker)
-- and pgflow_private.start_tasks (a TypeScript worker's read, then start), both restated
-- here around 0010's _start_tasks, which is unchanged. Before starting, _limit_batch sorts
-- the messages read into those that may start and those over a limit. Messages of steps
-- without limits, and messages whose task would not start anyway (duplicates, cancelled
-- tasks), always may. Those over a limit stay 'queued', their message kept and hidden
-- again: for 100 ms (c_retry in _limit_batch) when a concurrency limit held them, until
-- the next window when a rate limit did. A worker sleeps until the next message is
-- visible, so it comes back for them then. Within a step and a bucket, the oldest message starts first;
-- each bucket has its own slots, so a key with a long backlog does not hold back another.
-- A retried task waits for a slot again like any queued one.
--
-- THE UNLIMITED PATH
-- ------------------
-- One probe of pgflow_ext.step_limits' primary key per read (usually an empty table); no
-- work per task.
--
-- LOCKS
-- -----
-- The limit rows of the steps among the messages read are locked (in step order) before
-- their tasks are counted, so that two readers cannot both see a free slot: starts of one
-- limited step take turns, and the count sees every start committed before. Each locked
-- row is also updated (to the same values): a reader whose snapshot is older than the
-- previous start (REPEATABLE READ, SERIALIZABLE) gets a serialization failure instead of
-- a stale count. Lock order:
-- the read holds its messages first (0007, CANCEL), then limit rows, then 0001's order
-- (tasks, step states, runs), and the messages held back are hidden again last. Nothing
-- else locks a limit row but the functions that set limits and the cascade of a step's
-- deletion.
-- =====================================================================================

CREATE TABLE pgflow_ext.step_limits (
  flow_slug        text        NOT NULL,
  step_slug        text        NOT NULL,
  max_concurrent   integer,
  concurrency_key  text,
  rate_max_starts  integer,
  rate_period      interval,
  rate_key         text,
  updated_at       timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT step_limits_pkey PRIMARY KEY (flow_slug, step_slug),
  CONSTRAINT step_limits_step_fkey FOREIGN KEY (flow_slug, step_slug)
    REFERENCES pgflow.steps (flow_slug, step_slug) ON DELETE CASCADE,
  CONSTRAINT max_concurrent_is_valid CHECK (max_concurrent BETWEEN 1 AND 1000000),
  CONSTRAINT rate_max_starts_is_valid CHECK (rate_max_starts BETWEEN 1 AND 1000000),
  CONSTRAINT rate_period_is_valid
    CHECK (rate_period BETWEEN interval '1 second' AND interval '1 day'),
  CONSTRAINT rate_is_whole CHECK ((rate_max_starts IS NULL) = (rate_period IS NULL)),
  CONSTRAINT concurrency_key_needs_limit CHECK (concurrency_key IS NULL OR max_concurrent IS NOT NULL),
  CONSTRAINT rate_key_needs_limit CHECK (rate_key IS NULL OR rate_max_starts IS NOT NULL),
  CONSTRAINT keys_are_valid
    CHECK (octet_length(concurrency_key) BETWEEN 1 AND 255 AND octet_length(rate_key) BETWEEN 1 AND 255)
);
REVOKE ALL ON TABLE pgflow_ext.step_limits FROM public;

-- The current window of each rate-limited step (and bucket): how many of its tasks
-- started in it. A row of an older window counts as none; rows of a key-bucketed step
-- whose window is over are deleted when that step next starts tasks.
CREATE TABLE pgflow_ext.step_rate_windows (
  flow_slug  text    NOT NULL,
  step_slug  text    NOT NULL,
  bucket     text    NOT NULL,
  window_no  bigint  NOT NULL,
  started    integer NOT NULL,
  CONSTRAINT step_rate_windows_pkey PRIMARY KEY (flow_slug, step_slug, bucket),
  CONSTRAINT step_rate_windows_limit_fkey FOREIGN KEY (flow_slug, step_slug)
    REFERENCES pgflow_ext.step_limits (flow_slug, step_slug) ON DELETE CASCADE
);
REVOKE ALL ON TABLE pgflow_ext.step_rate_windows FROM public;

-- -------------------------------------------------------------------------------------
-- Setting limits (the owner's, as set_retry_policy)
-- -------------------------------------------------------------------------------------

-- Checks that step p_step_slug of flow p_flow_slug exists and that p_key is a usable key
-- name (NULL: no key).
CREATE FUNCTION pgflow._check_limit_target(p_flow_slug text, p_step_slug text, p_key text)
RETURNS void
LANGUAGE plpgsql
STABLE
SET search_path = ''
AS $$
BEGIN
  IF p_flow_slug IS NULL OR p_step_slug IS NULL THEN
    RAISE EXCEPTION 'flow_slug and step_slug must not be NULL'
      USING ERRCODE = 'null_value_not_allowed';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pgflow.steps s
                  WHERE s.flow_slug = p_flow_slug AND s.step_slug = p_step_slug) THEN
    RAISE EXCEPTION 'step % of flow % not found', p_step_slug, p_flow_slug
      USING ERRCODE = 'no_data_found';
  END IF;
  IF p_key IS NOT NULL AND octet_length(p_key) NOT BETWEEN 1 AND 255 THEN
    RAISE EXCEPTION 'key_name must be 1 to 255 bytes long (got % bytes)', octet_length(p_key)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
END;
$$;

-- Drops the row of a step left without any limit.
CREATE FUNCTION pgflow._drop_empty_limit(p_flow_slug text, p_step_slug text)
RETURNS void
LANGUAGE sql
VOLATILE
SET search_path = ''
AS $$
  DELETE FROM pgflow_ext.step_limits l
   WHERE l.flow_slug = p_flow_slug AND l.step_slug = p_step_slug
     AND l.max_concurrent IS NULL AND l.rate_max_starts IS NULL
$$;

-- At most max_concurrent tasks of the step started at once (per value of run input key
-- key_name when given); max_concurrent NULL removes the step's concurrency limit.
-- Idempotent: calling it again with the same values changes nothing.
CREATE FUNCTION pgflow.set_concurrency_limit(
  flow_slug text, step_slug text, max_concurrent integer, key_name text DEFAULT NULL
)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
BEGIN
  PERFORM pgflow._check_limit_target(set_concurrency_limit.flow_slug,
                                     set_concurrency_limit.step_slug,
                                     set_concurrency_limit.key_name);
  IF set_concurrency_limit.max_concurrent IS NULL THEN
    IF set_concurrency_limit.key_name IS NOT NULL THEN
      RAISE EXCEPTION 'key_name needs a max_concurrent'
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE pgflow_ext.step_limits l
       SET max_concurrent = NULL, concurrency_key = NULL, updated_at = now()
     WHERE l.flow_slug = set_concurrency_limit.flow_slug
       AND l.step_slug = set_concurrency_limit.step_slug;
    PERFORM pgflow._drop_empty_limit(set_concurrency_limit.flow_slug,
                                     set_concurrency_limit.step_slug);
    RETURN;
  END IF;
  IF set_concurrency_limit.max_concurrent NOT BETWEEN 1 AND 1000000 THEN
    RAISE EXCEPTION 'max_concurrent must be between 1 and 1000000 (got %)',
      set_concurrency_limit.max_concurrent
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  INSERT INTO pgflow_ext.step_limits AS l (flow_slug, step_slug, max_concurrent, concurrency_key)
  VALUES (set_concurrency_limit.flow_slug, set_concurrency_limit.step_slug,
          set_concurrency_limit.max_concurrent, set_concurrency_limit.key_name)
  ON CONFLICT ON CONSTRAINT step_limits_pkey DO UPDATE
     SET max_concurrent = excluded.max_concurrent,
         concurrency_key = excluded.concurrency_key,
         updated_at = now()
   WHERE (l.max_concurrent, l.concurrency_key) IS DISTINCT FROM
         (excluded.max_concurrent, excluded.concurrency_key);
END;
$$;

-- At most max_starts tasks of the step start per period (per value of run input key
-- key_name when given), in windows of that length aligned on the epoch; max_starts NULL
-- removes the step's rate limit. Idempotent. A changed limit starts counting afresh.
CREATE FUNCTION pgflow.set_rate_limit(
  flow_slug text, step_slug text, max_starts integer, per interval, key_name text DEFAULT NULL
)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
BEGIN
  PERFORM pgflow._check_limit_target(set_rate_limit.flow_slug, set_rate_limit.step_slug,
                                     set_rate_limit.key_name);
  IF set_rate_limit.max_starts IS NULL THEN
    IF set_rate_limit.key_name IS NOT NULL OR set_rate_limit.per IS NOT NULL THEN
      RAISE EXCEPTION 'per and key_name need a max_starts'
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM pgflow_ext.step_rate_windows w
     WHERE w.flow_slug = set_rate_limit.flow_slug AND w.step_slug = set_rate_limit.step_slug;
    UPDATE pgflow_ext.step_limits l
       SET rate_max_starts = NULL, rate_period = NULL, rate_key = NULL, updated_at = now()
     WHERE l.flow_slug = set_rate_limit.flow_slug
       AND l.step_slug = set_rate_limit.step_slug;
    PERFORM pgflow._drop_empty_limit(set_rate_limit.flow_slug, set_rate_limit.step_slug);
    RETURN;
  END IF;
  IF set_rate_limit.max_starts NOT BETWEEN 1 AND 1000000 THEN
    RAISE EXCEPTION 'max_starts must be between 1 and 1000000 (got %)', set_rate_limit.max_starts
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF set_rate_limit.per IS NULL
     OR set_rate_limit.per NOT BETWEEN interval '1 second' AND interval '1 day' THEN
    RAISE EXCEPTION 'per must be between 1 second and 1 day (got %)',
      coalesce(set_rate_limit.per::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  INSERT INTO pgflow_ext.step_limits AS l
         (flow_slug, step_slug, rate_max_starts, rate_period, rate_key)
  VALUES (set_rate_limit.flow_slug, set_rate_limit.step_slug, set_rate_limit.max_starts,
          set_rate_limit.per, set_rate_limit.key_name)
  ON CONFLICT ON CONSTRAINT step_limits_pkey DO UPDATE
     SET rate_max_starts = excluded.rate_max_starts,
         rate_period = excluded.rate_period,
         rate_key = excluded.rate_key,
         updated_at = now()
   WHERE (l.rate_max_starts, l.rate_period, l.rate_key) IS DISTINCT FROM
         (excluded.rate_max_starts, excluded.rate_period, excluded.rate_key);
  IF FOUND THEN
    DELETE FROM pgflow_ext.step_rate_windows w
     WHERE w.flow_slug = set_rate_limit.flow_slug AND w.step_slug = set_rate_limit.step_slug;
  END IF;
END;
$$;

-- Removes every limit of the step (step_slug given) or of every step of the flow.
CREATE FUNCTION pgflow.clear_limits(flow_slug text, step_slug text DEFAULT NULL)
RETURNS void
LANGUAGE sql
VOLATILE
SET search_path = ''
AS $$
  DELETE FROM pgflow_ext.step_limits l
   WHERE l.flow_slug = clear_limits.flow_slug
     AND (clear_limits.step_slug IS NULL OR l.step_slug = clear_limits.step_slug)
$$;

-- -------------------------------------------------------------------------------------
-- Enforcing them where tasks start
-- -------------------------------------------------------------------------------------

-- The bucket a run input falls in for key p_key: '' without a key, '-' when the input
-- has no such key (or is not an object), else the md5 of the value's JSON text.
CREATE FUNCTION pgflow._limit_bucket(p_input jsonb, p_key text)
RETURNS text
LANGUAGE sql
IMMUTABLE
PARALLEL SAFE
SET search_path = ''
AS $$
  SELECT CASE
           WHEN p_key IS NULL THEN ''
           WHEN jsonb_typeof(p_input) = 'object' AND p_input ? p_key THEN md5((p_input -> p_key)::text)
           ELSE '-'
         END
$$;

-- Sorts messages p_msg_ids of flow p_flow_slug into those that may start their task now
-- (admitted) and those held back by a limit (deferred, each with the time its message is
-- to be visible again). Locks the limit rows of the steps concerned and counts the
-- admitted starts in their rate windows. Called only when the flow has limits.
CREATE FUNCTION pgflow._limit_batch(
  p_flow_slug text, p_msg_ids bigint[],
  OUT admitted bigint[], OUT deferred bigint[], OUT deferred_vts timestamptz[]
)
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
DECLARE
  -- How long a message held back by a concurrency limit stays hidden: short, as a slot
  -- may free at any moment and nothing else tells the workers.
  c_retry CONSTANT interval := interval '100 milliseconds';
  v_now     timestamptz := clock_timestamp();
  v_limit   record;
  v_period  numeric;
  v_window  bigint;
  v_next    timestamptz;
BEGIN
  admitted := '{}';
  deferred := '{}';
  deferred_vts := '{}';
  FOR v_limit IN
    SELECT l.step_slug, l.max_concurrent, l.concurrency_key, l.rate_max_starts, l.rate_period,
           l.rate_key, coalesce(s.opt_timeout, f.opt_timeout) AS timeout,
           coalesce(s.opt_max_attempts, f.opt_max_attempts) AS max_attempts
      FROM pgflow_ext.step_limits l
      JOIN pgflow.steps s ON s.flow_slug = l.flow_slug AND s.step_slug = l.step_slug
      JOIN pgflow.flows f ON f.flow_slug = l.flow_slug
     WHERE l.flow_slug = p_flow_slug
       AND l.step_slug IN (SELECT t.step_slug FROM pgflow.step_tasks t
                            WHERE t.flow_slug = p_flow_slug AND t.message_id = ANY(p_msg_ids))
     ORDER BY l.step_slug
       FOR NO KEY UPDATE OF l
  LOOP
    -- A real update of the row, not only its lock: a reader under REPEATABLE READ or
    -- SERIALIZABLE whose snapshot predates our commit then fails to lock it (40001)
    -- instead of counting this step's started tasks as its older snapshot saw them and
    -- exceeding the limit. A lock alone leaves no row version for it to trip on.
    UPDATE pgflow_ext.step_limits l SET updated_at = l.updated_at
     WHERE l.flow_slug = p_flow_slug AND l.step_slug = v_limit.step_slug;
    v_window := NULL;
    v_next := NULL;
    IF v_limit.rate_max_starts IS NOT NULL THEN
      v_period := extract(epoch FROM v_limit.rate_period);
      v_window := floor(extract(epoch FROM v_now) / v_period)::bigint;
      v_next := to_timestamp((v_window + 1) * v_period);
      IF v_limit.rate_key IS NOT NULL THEN
        DELETE FROM pgflow_ext.step_rate_windows w
         WHERE w.flow_slug = p_flow_slug AND w.step_slug = v_limit.step_slug
           AND w.window_no < v_window;
      END IF;
    END IF;

    WITH candidates AS (
      -- The tasks of this step among the messages that would start: queued, or started
      -- by a worker lost past the timeout with attempts left (0010's _start_tasks).
      SELECT t.message_id AS msg_id,
             pgflow._limit_bucket(r.input, v_limit.concurrency_key) AS c_bucket,
             pgflow._limit_bucket(r.input, v_limit.rate_key) AS r_bucket
        FROM pgflow.step_tasks t
        JOIN pgflow.runs r ON r.run_id = t.run_id
       WHERE t.flow_slug = p_flow_slug
         AND t.message_id = ANY(p_msg_ids)
         AND t.step_slug = v_limit.step_slug
         AND r.status = 'started'
         AND (t.status = 'queued'
              OR (t.status = 'started'
                  AND t.started_at <= v_now - make_interval(secs => v_limit.timeout)
                  AND t.attempts_count < v_limit.max_attempts))
    ),
    running AS (
      -- Slots taken: this step's started tasks within their timeout, per bucket. Found
      -- through the flow's started runs (no index on task status: it would make every
      -- status change of every task a non-HOT update).
      SELECT pgflow._limit_bucket(r.input, v_limit.concurrency_key) AS c_bucket, count(*) AS n
        FROM pgflow.runs r
        JOIN pgflow.step_tasks t ON t.run_id = r.run_id AND t.step_slug = v_limit.step_slug
       WHERE v_limit.max_concurrent IS NOT NULL
         AND r.flow_slug = p_flow_slug
         AND r.status = 'started'
         AND t.status = 'started'
         AND t.started_at > v_now - make_interval(secs => v_limit.timeout)
       GROUP BY 1
    ),
    windows AS (
      SELECT w.bucket, w.started
        FROM pgflow_ext.step_rate_windows w
       WHERE w.flow_slug = p_flow_slug AND w.step_slug = v_limit.step_slug
         AND w.window_no = v_window
    ),
    ranked AS (
      SELECT c.msg_id, c.r_bucket,
             row_number() OVER (PARTITION BY c.c_bucket ORDER BY c.msg_id)
               + coalesce(ru.n, 0) AS c_rank,
             row_number() OVER (PARTITION BY c.r_bucket ORDER BY c.msg_id)
               + coalesce(w.started, 0) AS r_rank
        FROM candidates c
        LEFT JOIN running ru ON ru.c_bucket = c.c_bucket
        LEFT JOIN windows w ON w.bucket = c.r_bucket
    ),
    decided AS (
      SELECT r.msg_id, r.r_bucket,
             (v_limit.max_concurrent IS NULL OR r.c_rank <= v_limit.max_concurrent) AS c_ok,
             (v_limit.rate_max_starts IS NULL OR r.r_rank <= v_limit.rate_max_starts) AS r_ok
        FROM ranked r
    ),
    -- Executed whether or not read below (a data-modifying WITH always is).
    counted AS (
      INSERT INTO pgflow_ext.step_rate_windows AS w (flow_slug, step_slug, bucket, window_no, started)
      SELECT p_flow_slug, v_limit.step_slug, d.r_bucket, v_window, count(*)
        FROM decided d
       WHERE v_limit.rate_max_starts IS NOT NULL AND d.c_ok AND d.r_ok
       GROUP BY d.r_bucket
      ON CONFLICT ON CONSTRAINT step_rate_windows_pkey DO UPDATE
         SET started = CASE WHEN w.window_no = excluded.window_no
                            THEN w.started + excluded.started
                            ELSE excluded.started END,
             window_no = excluded.window_no
      RETURNING 1
    )
    SELECT deferred || coalesce(array_agg(d.msg_id ORDER BY d.msg_id)
                                  FILTER (WHERE NOT (d.c_ok AND d.r_ok)), '{}'),
           deferred_vts || coalesce(array_agg(
                             CASE WHEN NOT d.r_ok THEN greatest(v_next, v_now + c_retry)
                                  ELSE v_now + c_retry END ORDER BY d.msg_id)
                                  FILTER (WHERE NOT (d.c_ok AND d.r_ok)), '{}')
      INTO deferred, deferred_vts
      FROM decided d;
  END LOOP;

  -- Every message that is not held back may start: those of steps without limits, those
  -- admitted, and those whose task would not start anyway (_start_tasks sorts them out).
  admitted := ARRAY(SELECT m.id FROM unnest(p_msg_ids) AS m(id)
                     WHERE m.id IS NOT NULL AND NOT m.id = ANY(deferred)
                     ORDER BY m.id);
END;
$$;

-- Hides messages p_msg_ids of flow p_flow_slug's queue until p_vts (last: lock level 5).
CREATE FUNCTION pgflow._hide_messages(p_flow_slug text, p_msg_ids bigint[], p_vts timestamptz[])
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
BEGIN
  IF coalesce(cardinality(p_msg_ids), 0) = 0 THEN
    RETURN;
  END IF;
  EXECUTE format(
    'WITH locked AS ('
    '  SELECT q.msg_id FROM pgmq.%1$I q WHERE q.msg_id = ANY($1) ORDER BY q.msg_id FOR UPDATE'
    ') UPDATE pgmq.%1$I q SET vt = h.vt'
    '    FROM locked JOIN unnest($1, $2) AS h(msg_id, vt) ON h.msg_id = locked.msg_id'
    '   WHERE q.msg_id = locked.msg_id',
    'q_' || lower(p_flow_slug))
    USING p_msg_ids, p_vts;
END;
$$;

-- 0007's _read_and_start, with limits: when the flow has any, the messages read are
-- sorted by _limit_batch first; those held back are not started, and are hidden again
-- until their limit may have room (after every other lock).
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
  v_ids    bigint[];
  v_tasks  pgflow._started_task[];
  v_read   text;
  v_idle   bigint[];
  v_limited boolean := false;
  v_held   bigint[];
  v_vts    timestamptz[];
BEGIN
  v_read := pgflow._queue_function('read', p_flow_slug);
  IF v_read IS NULL THEN
    -- A queue without its functions: pgmq's own read (a missing queue fails there with
    -- PostgreSQL's 42P01), and start_tasks sets the visibility as for any worker.
    v_ids := ARRAY(SELECT m.msg_id FROM pgmq.read(p_flow_slug, p_vt, p_qty) AS m ORDER BY m.msg_id);
    IF EXISTS (SELECT 1 FROM pgflow_ext.step_limits l WHERE l.flow_slug = p_flow_slug) THEN
      v_limited := true;
      SELECT b.admitted, b.deferred, b.deferred_vts INTO v_ids, v_held, v_vts
        FROM pgflow._limit_batch(p_flow_slug, v_ids) AS b;
    END IF;
    v_tasks := ARRAY(
      SELECT t FROM pgflow._start_tasks(p_flow_slug, v_ids, p_worker_id, true) AS t);
    IF cardinality(v_tasks) < cardinality(v_ids) THEN
      PERFORM pgflow._drop_dead_messages(p_flow_slug, ARRAY(
        SELECT i FROM unnest(v_ids) AS i EXCEPT SELECT t.msg_id FROM unnest(v_tasks) AS t));
    END IF;
    IF v_limited THEN
      PERFORM pgflow._hide_messages(p_flow_slug, v_held, v_vts);
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

  -- The one probe the unlimited path pays.
  IF EXISTS (SELECT 1 FROM pgflow_ext.step_limits l WHERE l.flow_slug = p_flow_slug) THEN
    v_limited := true;
    SELECT b.admitted, b.deferred, b.deferred_vts INTO v_ids, v_held, v_vts
      FROM pgflow._limit_batch(p_flow_slug, v_ids) AS b;
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

  IF v_limited THEN
    PERFORM pgflow._hide_messages(p_flow_slug, v_held, v_vts);
  END IF;

  RETURN QUERY SELECT * FROM unnest(v_tasks);
END;
$$;

-- 0007's start_tasks (a TypeScript worker's path), with limits as _read_and_start.
CREATE OR REPLACE FUNCTION pgflow_private.start_tasks(flow_slug text, msg_ids bigint[], worker_id uuid)
RETURNS SETOF pgflow.step_task_record
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
ROWS 10
AS $$
DECLARE
  v_ids     bigint[] := start_tasks.msg_ids;
  v_tasks   pgflow._started_task[];
  v_limited boolean := false;
  v_held    bigint[];
  v_vts     timestamptz[];
BEGIN
  IF EXISTS (SELECT 1 FROM pgflow_ext.step_limits l WHERE l.flow_slug = start_tasks.flow_slug) THEN
    v_limited := true;
    SELECT b.admitted, b.deferred, b.deferred_vts INTO v_ids, v_held, v_vts
      FROM pgflow._limit_batch(start_tasks.flow_slug, v_ids) AS b;
  END IF;
  v_tasks := ARRAY(
    SELECT t FROM pgflow._start_tasks(start_tasks.flow_slug, v_ids,
                                      start_tasks.worker_id, true) AS t);
  IF cardinality(v_tasks) < coalesce(cardinality(v_ids), 0) THEN
    PERFORM pgflow._drop_dead_messages(start_tasks.flow_slug, ARRAY(
      SELECT i FROM unnest(v_ids) AS i
      EXCEPT SELECT t.msg_id FROM unnest(v_tasks) AS t));
  END IF;
  IF v_limited THEN
    PERFORM pgflow._hide_messages(start_tasks.flow_slug, v_held, v_vts);
  END IF;
  RETURN QUERY
  SELECT t.flow_slug, t.run_id, t.step_slug, t.input, t.msg_id, t.task_index
    FROM unnest(v_tasks) AS t;
END;
$$;

-- -------------------------------------------------------------------------------------
-- Privileges
-- -------------------------------------------------------------------------------------

REVOKE EXECUTE ON FUNCTION
  pgflow._check_limit_target(text, text, text),
  pgflow._drop_empty_limit(text, text),
  pgflow.set_concurrency_limit(text, text, integer, text),
  pgflow.set_rate_limit(text, text, integer, interval, text),
  pgflow.clear_limits(text, text),
  pgflow._limit_bucket(jsonb, text),
  pgflow._limit_batch(text, bigint[]),
  pgflow._hide_messages(text, bigint[], timestamptz[])
  FROM public;

-- Whoever may set a step's retry policy may set its limits.
SELECT pgflow._copy_execute_grants('pgflow.set_retry_policy(text, text, integer, boolean)',
                                   'pgflow.set_concurrency_limit(text, text, integer, text)'),
       pgflow._copy_execute_grants('pgflow.set_retry_policy(text, text, integer, boolean)',
                                   'pgflow.set_rate_limit(text, text, integer, interval, text)'),
       pgflow._copy_execute_grants('pgflow.set_retry_policy(text, text, integer, boolean)',
                                   'pgflow.clear_limits(text, text)');
