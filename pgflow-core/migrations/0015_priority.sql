-- =====================================================================================
-- pgflow engine, migration 0015: Run priority (issue 22).
-- =====================================================================================
--
-- No pgflow version has this; the names follow the engine's style and everything is
-- additive (docs/sql-api.md, "Run priority"). start_flow keeps 0.8.1's signature and
-- behaviour; a run with a priority is started by start_flow_with_priority.
--
-- WHAT IT MEANS
-- -------------
-- A run has a priority, a smallint, 0 unless started with another. Among the visible
-- messages of a flow's queue, the Rust worker's read (_read_and_start, through the
-- queue's read function) takes those of the highest priority first, and within one
-- priority those visible longest first (vt, then msg_id), as the plain read does. Every
-- task of the run carries it: root tasks, the tasks of steps started later, map tasks,
-- a task retried after a failure (its message is the same one, made visible again), a
-- stalled task requeued and the tasks a retry_run sends again. Nothing else changes:
-- a started task is never interrupted for a higher one, timeouts, retries and delays are
-- as before. A flood of higher-priority runs starves lower ones for as long as it lasts:
-- there is no ageing (a fair-share order would need the read to scan every visible
-- message, which is the cost this design avoids).
--
-- WHERE IT LIVES
-- --------------
-- pgflow_ext.run_priorities holds one row per run whose priority is not 0 (the row goes
-- with its run). The order itself needs the priority beside each message, in the queue
-- table, where an index can serve "highest first, oldest first" without scanning: a
-- BEFORE INSERT trigger on the queue table copies the run's priority into the message's
-- pgmq headers as {"pgflow_priority": n}, whichever engine function sends the message
-- (start, a released step, a requeue, a retried run), so no sending function is
-- replaced. The message itself keeps exactly 0.8.1's four keys. A message without the
-- header (every message of a run without a priority) counts as 0.
--
-- WHAT A FLOW THAT NEVER USES IT PAYS
-- -----------------------------------
-- Nothing: the index, the trigger and the ordering read are made for a flow's queue only
-- when it first gets a run with a priority other than 0 (or when enable_run_priority is
-- called for it). Until then its queue has pgmq's table as it was, the plain read of
-- 0001 and no trigger, and start_flow is untouched. A run started with priority 0 is
-- started exactly as start_flow starts it.
--
-- THE READ
-- --------
-- The queue's read function (0001, _create_queue_functions) is replaced, for that queue
-- only, by one that walks the priority levels present in the queue from the highest
-- down: per level one range scan of the index (level, vt, msg_id) over the visible
-- messages, skipping those another reader holds, until p_qty are taken; the next lower
-- level is found by one descent of the same index. A read so costs one index descent
-- per level present in the queue above the last level it reads from, plus the messages
-- it takes, whatever the number of hidden messages (tasks in flight, delayed or
-- scheduled). Everything else is the plain read's: what it hides and for how long,
-- read_ct, last_read_at. The replacement keeps the function's name, signature and
-- grants, so _read_and_start (whatever migration defines it last) calls it unchanged.
-- Should _create_queue_functions be run again for the queue, it writes the plain read
-- back; the next start with a priority notices (the read's marker is gone) and writes
-- the ordering read again.
--
-- OTHER READERS
-- -------------
-- pgmq.read, which TypeScript workers call before start_tasks, reads in msg_id order and
-- knows nothing of priorities: a flow served by them gets no priority order from them.
-- They keep working (the header is one they do not read).
--
-- LOCKS
-- -----
-- Enabling a queue creates an index on its table, which holds a SHARE lock on the table
-- until the enabling transaction ends: sends and reads of that queue wait that long, once.
-- On a queue with a large backlog, call enable_run_priority at deployment rather than let
-- the first start with a priority do it at a busy moment. Two first starts at once take
-- turns (an advisory lock keyed by the queue); the second finds the queue enabled.
-- =====================================================================================

-- -------------------------------------------------------------------------------------
-- The table
-- -------------------------------------------------------------------------------------

-- The foreign key is checked at commit: start_flow_with_priority writes the row before
-- the run, so that the trigger finds it when the run's first messages are sent.
CREATE TABLE pgflow_ext.run_priorities (
  run_id   uuid     NOT NULL,
  priority smallint NOT NULL,
  CONSTRAINT run_priorities_pkey PRIMARY KEY (run_id),
  CONSTRAINT run_priorities_run_id_fkey FOREIGN KEY (run_id)
    REFERENCES pgflow.runs (run_id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
  -- Priority 0 is the absence of a row: the trigger then has nothing to write.
  CONSTRAINT run_priorities_not_default CHECK (priority <> 0)
);

REVOKE ALL ON TABLE pgflow_ext.run_priorities FROM public;

-- -------------------------------------------------------------------------------------
-- The header and its index
-- -------------------------------------------------------------------------------------

-- The priority of a queue row, as the index and the ordering read write it: the header
-- the trigger set, else 0. One text, so that the read's conditions match the index's
-- expression exactly. Total: a header no trigger wrote (a message sent before the queue
-- was enabled, by anyone) that is not a JSON integer within smallint's range counts as 0,
-- so that it can never make the index's creation, a send or a read fail. The regex
-- admits at most 5 digits, so the integer cast cannot fail; the nested CASE orders the
-- checks before the casts.
CREATE FUNCTION pgflow._priority_expression()
RETURNS text
LANGUAGE sql
IMMUTABLE
SET search_path = ''
AS $$
  SELECT $e$(CASE WHEN jsonb_typeof(q.headers -> 'pgflow_priority') = 'number' AND (q.headers ->> 'pgflow_priority') ~ '^-?[0-9]{1,5}$' THEN CASE WHEN (q.headers ->> 'pgflow_priority')::integer BETWEEN -32768 AND 32767 THEN (q.headers ->> 'pgflow_priority')::smallint ELSE 0::smallint END ELSE 0::smallint END)$e$
$$;

-- The name of the priority index of queue table pgmq.q_<p_queue>: within PostgreSQL's 63
-- characters for the longest queue name pgmq takes (47), and never a name pgmq gives
-- (its tables begin with q_ and a_, its indexes with the table's name).
CREATE FUNCTION pgflow._priority_index_name(p_queue text)
RETURNS text
LANGUAGE sql
IMMUTABLE
SET search_path = ''
AS $$
  SELECT 'pgflow_prio_' || lower(p_queue)
$$;

-- BEFORE INSERT on an enabled queue's table: the run's priority into the message's
-- headers, or no header for a run without one (a header written by another sender is
-- removed: only a run's row decides). Runs as the owner, so that any role allowed to
-- send to the queue may. A message whose run_id is not a uuid names no run and gets none.
CREATE FUNCTION pgflow._set_message_priority()
RETURNS trigger
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_run      text := NEW.message ->> 'run_id';
  v_priority smallint;
BEGIN
  IF v_run ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$' THEN
    SELECT p.priority INTO v_priority
      FROM pgflow_ext.run_priorities p
     WHERE p.run_id = v_run::uuid;
  END IF;
  IF v_priority IS NOT NULL THEN
    NEW.headers := CASE WHEN jsonb_typeof(NEW.headers) = 'object' THEN NEW.headers
                        ELSE '{}'::jsonb END
                   || jsonb_build_object('pgflow_priority', v_priority);
  ELSIF jsonb_typeof(NEW.headers) = 'object' AND NEW.headers ? 'pgflow_priority' THEN
    NEW.headers := NEW.headers - 'pgflow_priority';
  END IF;
  RETURN NEW;
END;
$$;

-- -------------------------------------------------------------------------------------
-- Enabling a queue
-- -------------------------------------------------------------------------------------

-- Whether flow p_flow_slug's queue orders its reads by priority: its index exists and its
-- read function is the ordering one (its source carries the marker below). Catalog
-- lookups only; false for a queue that does not exist.
CREATE FUNCTION pgflow._run_priority_enabled(p_flow_slug text)
RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = ''
AS $$
  SELECT pg_catalog.to_regclass('pgmq.' || quote_ident(pgflow._priority_index_name(p_flow_slug)))
           IS NOT NULL
     AND EXISTS (
           SELECT 1 FROM pg_catalog.pg_proc p
            WHERE p.pronamespace = 'pgflow'::regnamespace
              AND p.proname = '_queue_read_' || lower(p_flow_slug)
              AND p.prosrc LIKE '%pgflow 0015: priority read%')
     AND EXISTS (
           SELECT 1 FROM pg_catalog.pg_trigger t
            WHERE t.tgrelid = pg_catalog.to_regclass('pgmq.' || quote_ident('q_' || lower(p_flow_slug)))
              AND t.tgname = 'pgflow_priority')
$$;

-- Makes flow p_flow_slug's queue order reads by priority (see THE READ above): the index,
-- the trigger and the ordering read function. Idempotent; returns whether it changed
-- anything. The owner's; start_flow_with_priority calls it (as the owner) on first use.
CREATE FUNCTION pgflow.enable_run_priority(flow_slug text)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $gen$
DECLARE
  v_queue     text := lower(enable_run_priority.flow_slug);
  v_table     text := 'q_' || lower(enable_run_priority.flow_slug);
  v_expr      text := pgflow._priority_expression();
  v_last_read boolean;
  v_settings  text := $s$SET search_path = ''
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off$s$;
BEGIN
  IF enable_run_priority.flow_slug IS NULL THEN
    RAISE EXCEPTION 'flow_slug must not be NULL' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  IF pg_catalog.to_regclass('pgmq.' || quote_ident(v_table)) IS NULL THEN
    RAISE EXCEPTION 'flow "%" has no queue (pgmq.%): create the flow first',
      enable_run_priority.flow_slug, v_table
      USING ERRCODE = 'undefined_table';
  END IF;
  IF pgflow._run_priority_enabled(v_queue) THEN
    RETURN false;
  END IF;
  -- One enabler per queue at a time; a second finds the first's work once it commits.
  PERFORM pg_advisory_xact_lock(hashtext('pgflow_run_priority'), hashtext(v_queue));
  IF pgflow._run_priority_enabled(v_queue) THEN
    RETURN false;
  END IF;

  EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON pgmq.%I ((%s), vt, msg_id)',
                 pgflow._priority_index_name(v_queue), v_table,
                 replace(v_expr, 'q.', ''));
  EXECUTE format('DROP TRIGGER IF EXISTS pgflow_priority ON pgmq.%I', v_table);
  EXECUTE format('CREATE TRIGGER pgflow_priority BEFORE INSERT ON pgmq.%I '
                 'FOR EACH ROW EXECUTE FUNCTION pgflow._set_message_priority()', v_table);

  -- A queue made without its functions (pgmq.create directly) gets them first, with
  -- their grants; the read is then replaced below, keeping those grants.
  IF pgflow._queue_function('read', v_queue) IS NULL
     OR pgflow._queue_function('send', v_queue) IS NULL THEN
    PERFORM pgflow._create_queue_functions(v_queue);
  END IF;

  v_last_read := EXISTS (
    SELECT 1 FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = pg_catalog.to_regclass('pgmq.' || quote_ident(v_table))
       AND a.attname = 'last_read_at'
       AND NOT a.attisdropped);

  -- 0001's read, ordered by priority level first (THE READ above). Levels are walked
  -- from the highest down, each read as a range of the index: (level, vt <= now) in
  -- (vt, msg_id) order.
  EXECUTE format($f$
CREATE OR REPLACE FUNCTION pgflow.%1$I(p_flow_slug text, p_qty integer, p_vt integer)
RETURNS bigint[]
LANGUAGE plpgsql
VOLATILE
%3$s
AS $body$
-- pgflow 0015: priority read (pgflow._run_priority_enabled looks for this line).
DECLARE
  v_ids   bigint[] := '{}';
  v_now   timestamptz := clock_timestamp();
  v_level smallint;
BEGIN
  v_level := (SELECT %5$s FROM pgmq.%2$I q ORDER BY %5$s DESC LIMIT 1);
  WHILE v_level IS NOT NULL AND cardinality(v_ids) < p_qty LOOP
    v_ids := v_ids || ARRAY(
      SELECT q.msg_id FROM pgmq.%2$I q
       WHERE %5$s = v_level
         AND q.vt <= v_now
       ORDER BY %5$s, q.vt, q.msg_id
       LIMIT p_qty - cardinality(v_ids)
         FOR UPDATE SKIP LOCKED);
    EXIT WHEN cardinality(v_ids) >= p_qty;
    v_level := (SELECT %5$s FROM pgmq.%2$I q WHERE %5$s < v_level
                 ORDER BY %5$s DESC LIMIT 1);
  END LOOP;
  IF cardinality(v_ids) = 0 THEN
    RETURN NULL;
  END IF;

  WITH read AS (
    UPDATE pgmq.%2$I q
       SET vt = clock_timestamp() + make_interval(secs => coalesce(
             (SELECT coalesce(s.opt_timeout, f.opt_timeout) + 2
                FROM pgflow.steps s
                JOIN pgflow.flows f ON f.flow_slug = s.flow_slug
               WHERE s.flow_slug = p_flow_slug
                 AND s.step_slug = q.message ->> 'step_slug'),
             p_vt)),
           read_ct = q.read_ct + 1%4$s
     WHERE q.msg_id = ANY(v_ids)
    RETURNING q.msg_id
  )
  SELECT array_agg(read.msg_id ORDER BY read.msg_id) INTO v_ids FROM read;
  RETURN v_ids;
END;
$body$$f$, '_queue_read_' || v_queue, v_table, v_settings,
    CASE WHEN v_last_read THEN ', last_read_at = clock_timestamp()' ELSE '' END,
    v_expr);
  RETURN true;
END;
$gen$;

-- -------------------------------------------------------------------------------------
-- Starting a run with a priority
-- -------------------------------------------------------------------------------------

-- Starts a run as start_flow does (start_flow_at when start_at is given), with priority
-- `priority`: -32768 to 32767, higher first; NULL and 0 are the default, and such a run
-- is started exactly as start_flow starts it. The first run of a flow with another
-- priority enables the flow's queue (enable_run_priority).
CREATE FUNCTION pgflow.start_flow_with_priority(
  flow_slug text, input jsonb, priority integer, run_id uuid DEFAULT NULL,
  start_at timestamptz DEFAULT NULL
)
RETURNS SETOF pgflow.runs
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_run_id uuid := coalesce(start_flow_with_priority.run_id, gen_random_uuid());
BEGIN
  IF start_flow_with_priority.priority NOT BETWEEN -32768 AND 32767 THEN
    RAISE EXCEPTION 'priority must be between -32768 and 32767 (got %)',
      start_flow_with_priority.priority
      USING ERRCODE = 'numeric_value_out_of_range',
            HINT = 'Higher runs first; 0 is the default.';
  END IF;

  IF coalesce(start_flow_with_priority.priority, 0) <> 0 THEN
    -- An unknown flow or a missing queue is left to _start_flow's own errors.
    IF pg_catalog.to_regclass('pgmq.' || quote_ident('q_' || lower(start_flow_with_priority.flow_slug)))
         IS NOT NULL
       AND NOT pgflow._run_priority_enabled(start_flow_with_priority.flow_slug) THEN
      PERFORM pgflow.enable_run_priority(start_flow_with_priority.flow_slug);
    END IF;
    -- Before the run, so that its first messages get the header as they are sent; a
    -- run id already taken then fails in _start_flow on runs_pkey, as start_flow does,
    -- and this row goes with the statement.
    INSERT INTO pgflow_ext.run_priorities (run_id, priority)
    VALUES (v_run_id, start_flow_with_priority.priority::smallint)
    ON CONFLICT ON CONSTRAINT run_priorities_pkey DO NOTHING;
  END IF;

  RETURN QUERY
  SELECT * FROM pgflow._start_flow(start_flow_with_priority.flow_slug,
                                   start_flow_with_priority.input, v_run_id,
                                   start_flow_with_priority.start_at);
END;
$$;

-- The priority of run p_run_id: 0 without a row (the default, or no such run).
CREATE FUNCTION pgflow.run_priority(p_run_id uuid)
RETURNS smallint
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
  SELECT coalesce((SELECT p.priority FROM pgflow_ext.run_priorities p
                    WHERE p.run_id = p_run_id), 0::smallint)
$$;

-- -------------------------------------------------------------------------------------
-- Privileges: the owner's until granted (docs/security.md)
-- -------------------------------------------------------------------------------------

REVOKE EXECUTE ON FUNCTION
  pgflow._priority_expression(),
  pgflow._priority_index_name(text),
  pgflow._set_message_priority(),
  pgflow._run_priority_enabled(text),
  pgflow.enable_run_priority(text),
  pgflow.start_flow_with_priority(text, jsonb, integer, uuid, timestamptz),
  pgflow.run_priority(uuid)
  FROM public;

-- Whoever may start runs may start them with a priority and read it back.
SELECT pgflow._copy_execute_grants('pgflow.start_flow(text, jsonb, uuid)'::regprocedure,
         'pgflow.start_flow_with_priority(text, jsonb, integer, uuid, timestamptz)'::regprocedure),
       pgflow._copy_execute_grants('pgflow.start_flow(text, jsonb, uuid)'::regprocedure,
         'pgflow.run_priority(uuid)'::regprocedure);
