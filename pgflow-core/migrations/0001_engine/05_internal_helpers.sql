-- -------------------------------------------------------------------------------------
-- Internal helpers (underscore-prefixed: not part of the pgflow 0.8.1 surface)
-- -------------------------------------------------------------------------------------

-- Whether realtime.send(jsonb, text, text, boolean) exists (Supabase), found by the fixed
-- oids of those built-in types, where to_regprocedure would run the SQL parser on the
-- signature for every event. PL/pgSQL, not SQL: a SQL function with a SET clause is never
-- inlined and plans its query on every call (before PostgreSQL 18), and this runs once
-- per event; PL/pgSQL keeps the plan for the session.
CREATE FUNCTION pgflow._has_realtime()
RETURNS boolean
LANGUAGE plpgsql
STABLE
SET search_path = ''
AS $$
BEGIN
  -- Plain PostgreSQL has no such schema: a cache lookup answers, without a query.
  IF pg_catalog.to_regnamespace('realtime') IS NULL THEN
    RETURN false;
  END IF;
  RETURN EXISTS (
    SELECT 1
      FROM pg_catalog.pg_proc p
      JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
     WHERE n.nspname = 'realtime'
       AND p.proname = 'send'
       AND p.proargtypes = '3802 25 25 16'::pg_catalog.oidvector);
END;
$$;

-- The one place events leave the engine (see EVENTS at the top): every event of
-- `events`, in array order. One call per statement that changes many rows: a call per
-- event cost a function call with its settings, and a realtime lookup, each time.
CREATE FUNCTION pgflow._emit_all(events jsonb[])
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
  IF coalesce(cardinality(events), 0) = 0 THEN
    RETURN;
  END IF;

  PERFORM pg_notify('pgflow', (
            CASE
              WHEN jsonb_typeof(e.event -> 'error_message') = 'string'
                THEN jsonb_set(e.event - 'output' - 'input', '{error_message}',
                               to_jsonb(left(e.event ->> 'error_message', 1000)))
              ELSE e.event - 'output' - 'input'
            END)::text)
     FROM unnest(events) WITH ORDINALITY AS e(event, ord)
    ORDER BY e.ord;

  IF pgflow._has_realtime() THEN
    PERFORM realtime.send(
              e.event,
              CASE
                WHEN e.event ->> 'event_type' LIKE 'step:%'
                  THEN 'step:' || (e.event ->> 'step_slug') || ':'
                       || split_part(e.event ->> 'event_type', ':', 2)
                ELSE e.event ->> 'event_type'
              END,
              'pgflow:run:' || (e.event ->> 'run_id'),
              false)
       FROM unnest(events) WITH ORDINALITY AS e(event, ord)
      ORDER BY e.ord;
  END IF;
END;
$$;

-- One event.
CREATE FUNCTION pgflow._emit(event jsonb)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
BEGIN
  PERFORM pgflow._emit_all(ARRAY[event]);
END;
$$;

-- A finished step's output as its dependents see it: the single task's output, or the
-- map's task outputs ordered by task_index (`[]` for an empty map). O(tasks); used once
-- per consumer (single-step inputs, leaf outputs, realtime events), never per map task.
CREATE FUNCTION pgflow._step_output(p_run_id uuid, p_step_slug text, p_step_type text)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
BEGIN
  IF p_step_type = 'map' THEN
    RETURN (
      SELECT coalesce(jsonb_agg(t.output ORDER BY t.task_index), '[]'::jsonb)
      FROM pgflow.step_tasks t
      WHERE t.run_id = p_run_id
        AND t.step_slug = p_step_slug
        AND t.status = 'completed'
    );
  END IF;
  RETURN (
    SELECT t.output
    FROM pgflow.step_tasks t
    WHERE t.run_id = p_run_id
      AND t.step_slug = p_step_slug
      AND t.task_index = 0
      AND t.status = 'completed'
  );
END;
$$;

-- Prepares this session's archive statement for queue `p_queue` (lower case) under the
-- name `p_name` (_archive_messages names it), and marks it prepared in setting
-- pgflow.<p_name>; false when the queue's tables do not exist. The statement locks the
-- messages in msg_id order, deletes them and inserts them into the archive table with every
-- column the two tables share (pgmq versions differ: headers, last_read_at) and
-- archived_at from its default, as pgmq.archive does.
--
-- Why prepared: a queue's table names are only known at run time, so the statement is
-- dynamic SQL, which PL/pgSQL parses and plans on every EXECUTE: about 0.3 ms per call
-- under load, more than running it. Settings are transactional and prepared statements
-- are not, so the two can part: a statement left over by a rolled-back transaction is
-- replaced here, and _archive_messages prepares again when the statement was deallocated
-- behind its back or the queue's tables changed. DISCARD ALL and new sessions drop both.
CREATE FUNCTION pgflow._prepare_archive(p_name text, p_queue text)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_cols text;
  v_sql  text;
BEGIN
  SELECT string_agg(quote_ident(qa.attname), ', ' ORDER BY qa.attnum)
    INTO v_cols
    FROM pg_catalog.pg_namespace n
    JOIN pg_catalog.pg_class qc ON qc.relnamespace = n.oid AND qc.relname = 'q_' || p_queue
    JOIN pg_catalog.pg_class ac ON ac.relnamespace = n.oid AND ac.relname = 'a_' || p_queue
    JOIN pg_catalog.pg_attribute qa ON qa.attrelid = qc.oid AND qa.attnum > 0 AND NOT qa.attisdropped
    JOIN pg_catalog.pg_attribute aa ON aa.attrelid = ac.oid AND aa.attname = qa.attname
                                   AND NOT aa.attisdropped
   WHERE n.nspname = 'pgmq';

  IF v_cols IS NULL THEN
    PERFORM set_config('pgflow.' || p_name, '', false);
    RETURN false;
  END IF;

  v_sql := format(
    'PREPARE %1$I(bigint[]) AS WITH locked AS ('
    '  SELECT q.msg_id FROM pgmq.%2$I q WHERE q.msg_id = ANY($1) ORDER BY q.msg_id FOR UPDATE'
    '), gone AS ('
    '  DELETE FROM pgmq.%2$I q USING locked WHERE q.msg_id = locked.msg_id RETURNING q.*'
    ') INSERT INTO pgmq.%3$I (%4$s) SELECT %4$s FROM gone',
    p_name, 'q_' || p_queue, 'a_' || p_queue, v_cols);
  BEGIN
    EXECUTE v_sql;
  EXCEPTION WHEN duplicate_prepared_statement THEN
    EXECUTE format('DEALLOCATE %I', p_name);
    EXECUTE v_sql;
  END;
  PERFORM set_config('pgflow.' || p_name, 'prepared', false);
  RETURN true;
END;
$$;

-- Archive messages of one queue (lock level 5): what pgmq.archive does, with the
-- session's prepared statement (_prepare_archive) instead of pgmq's function layers and
-- two dynamic statements, and locking in msg_id order: two multi-message archivers /
-- set_vt_batch calls locking overlapping sets in different orders could deadlock.
CREATE FUNCTION pgflow._archive_messages(p_queue_name text, p_msg_ids bigint[])
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
  v_queue text := lower(p_queue_name);
  -- The session's prepared statement for this queue (_prepare_archive).
  v_name  text := 'pgflow_archive_' || lower(p_queue_name);
  v_ids   bigint[];
  v_try   integer;
BEGIN
  SELECT array_agg(DISTINCT m.id ORDER BY m.id)
    INTO v_ids
    FROM unnest(p_msg_ids) AS m(id)
   WHERE m.id IS NOT NULL;

  IF v_ids IS NULL THEN
    RETURN;
  END IF;

  IF current_setting('pgflow.' || v_name, true) IS DISTINCT FROM 'prepared'
     AND NOT pgflow._prepare_archive(v_name, v_queue) THEN
    -- No such queue: pgmq says so in its own words.
    PERFORM pgmq.archive(p_queue_name, v_ids);
    RETURN;
  END IF;

  -- Rarely, a concurrent transaction still ends up waiting on messages this one locks
  -- while holding one that this one needs; the deadlock detector then aborts one side.
  -- The archive runs in a subtransaction, so when this side is chosen only its message
  -- locks are released, the other side goes on, and the archive is retried.
  FOR v_try IN 1 .. 5 LOOP
    BEGIN
      EXECUTE format('EXECUTE %I(%L)', v_name, v_ids);
      RETURN;
    EXCEPTION
      WHEN deadlock_detected THEN
        IF v_try = 5 THEN
          RAISE;
        END IF;
        PERFORM pg_sleep(0.001 * v_try);
      WHEN invalid_sql_statement_name OR undefined_table OR undefined_column THEN
        -- Deallocated behind our back, or the queue's tables changed since it was
        -- prepared: prepare it again.
        IF v_try = 5 THEN
          RAISE;
        END IF;
        IF NOT pgflow._prepare_archive(v_name, v_queue) THEN
          PERFORM pgmq.archive(p_queue_name, v_ids);
          RETURN;
        END IF;
    END;
  END LOOP;
END;
$$;

-- _archive_messages for messages of several queues (queues[i] holds msg_ids[i]), one
-- queue at a time in queue order.
CREATE FUNCTION pgflow._archive_batch(p_queues text[], p_msg_ids bigint[])
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
  v_queue text;
  v_msgs  bigint[];
BEGIN
  IF coalesce(cardinality(p_msg_ids), 0) = 0 THEN
    RETURN;
  END IF;
  IF p_queues[1] = ALL(p_queues) THEN
    PERFORM pgflow._archive_messages(p_queues[1], p_msg_ids);
    RETURN;
  END IF;
  FOR v_queue, v_msgs IN
    SELECT a.queue, array_agg(a.msg_id)
      FROM unnest(p_queues, p_msg_ids) AS a(queue, msg_id)
     GROUP BY a.queue
     ORDER BY a.queue
  LOOP
    PERFORM pgflow._archive_messages(v_queue, v_msgs);
  END LOOP;
END;
$$;

-- Fail a step and its run (the caller holds the task, step-state and run locks and has
-- already failed the task). Returns the messages of the run's queued / started tasks;
-- the caller archives them last, per the lock order.
CREATE FUNCTION pgflow._fail_run(
  p_run_id        uuid,
  p_flow_slug     text,
  p_step_slug     text,
  p_error_message text
)
RETURNS bigint[]
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
BEGIN
  UPDATE pgflow.step_states ss
     SET status = 'failed',
         failed_at = now(),
         error_message = p_error_message
   WHERE ss.run_id = p_run_id
     AND ss.step_slug = p_step_slug;

  UPDATE pgflow.runs r
     SET status = 'failed',
         failed_at = now()
   WHERE r.run_id = p_run_id;

  PERFORM pgflow._emit(jsonb_build_object(
    'event_type', 'step:failed',
    'run_id', p_run_id,
    'flow_slug', p_flow_slug,
    'step_slug', p_step_slug,
    'status', 'failed',
    'error_message', p_error_message,
    'failed_at', now()
  ));
  PERFORM pgflow._emit(jsonb_build_object(
    'event_type', 'run:failed',
    'run_id', p_run_id,
    'flow_slug', p_flow_slug,
    'status', 'failed',
    'error_message', p_error_message,
    'failed_at', now()
  ));

  RETURN ARRAY(
    SELECT t.message_id
      FROM pgflow.step_tasks t
     WHERE t.run_id = p_run_id
       AND t.status IN ('queued', 'started')
       AND t.message_id IS NOT NULL
  );
END;
$$;

-- The send of messages to queue table pgmq.<p_table>, with the messages and their vt
-- as $2 and $1 (what pgmq.send_batch inserts, headers NULL), returning the new ids in
-- order: ids are assigned in insertion order, so the i-th smallest belongs to the i-th
-- message. The queue's send function runs it as static SQL, and _start_ready_steps as
-- dynamic SQL for a queue without one.
CREATE FUNCTION pgflow._send_statement(p_table text)
RETURNS text
LANGUAGE sql
IMMUTABLE
SET search_path = ''
AS $$
  SELECT format(
    'WITH sent AS ('
    '  INSERT INTO pgmq.%I (vt, message)'
    '  SELECT m.vt, m.message'
    '    FROM unnest($1::timestamptz[], $2::jsonb[]) WITH ORDINALITY AS m(vt, message, ord)'
    '   ORDER BY m.ord'
    '  RETURNING msg_id'
    ') SELECT array_agg(sent.msg_id ORDER BY sent.msg_id) FROM sent',
    p_table)
$$;

-- The queue's own functions: _queue_send_<queue> and _queue_read_<queue>, the engine's send
-- and the Rust worker's read with the queue's table named in static SQL. A queue's table
-- is only known at run time, so without them each call runs dynamic SQL, which PL/pgSQL
-- parses and plans every time (more than running it, for a send of one task); in a
-- function of their own the statements are planned once per session, and the caller only
-- plans a function call. create_flow makes them; a queue without them (made by
-- pgmq.create directly) falls back to dynamic SQL. Re-running this function replaces them,
-- for a queue whose table changed (pgmq versions differ: last_read_at).
CREATE FUNCTION pgflow._create_queue_functions(p_queue text)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $gen$
DECLARE
  v_queue     text := lower(p_queue);
  v_table     text := 'q_' || lower(p_queue);
  v_last_read boolean;
  v_grant     record;
  v_settings  text := $s$SET search_path = ''
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off$s$;
BEGIN
  v_last_read := EXISTS (
    SELECT 1 FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = to_regclass('pgmq.' || quote_ident(v_table))
       AND a.attname = 'last_read_at'
       AND NOT a.attisdropped);

  -- The send (_send_statement), whose $1 and $2 are this function's parameters.
  EXECUTE format($f$
CREATE OR REPLACE FUNCTION pgflow.%1$I(p_vts timestamptz[], p_messages jsonb[])
RETURNS bigint[]
LANGUAGE plpgsql
VOLATILE
%3$s
AS $body$
DECLARE
  v_ids bigint[];
BEGIN
  %2$s INTO v_ids;
  RETURN v_ids;
END;
$body$$f$, '_queue_send_' || v_queue, pgflow._send_statement(v_table), v_settings);

  -- What pgmq.read(queue, p_vt, p_qty) does, except that a message of a step of flow
  -- p_flow_slug is hidden for the step's timeout + 2 seconds at once (_read_and_start), and
  -- that the messages visible longest come first (vt order, not msg_id order): a range scan
  -- of the vt index touches only visible messages, where msg_id order walks every hidden
  -- one at the head of the queue, i.e. every task in flight, on each read. The time is
  -- taken once so that it can bound that scan (clock_timestamp() in the condition cannot).
  -- Messages sent together share their vt and come in no particular order among themselves
  -- (the index orders equal keys by row position); the ids read are returned sorted.
  -- The messages read are updated by msg_id = ANY(array), an index lookup whatever the
  -- statistics: joined to `next`, the planner would hash a scan of the whole queue table.
  EXECUTE format($f$
CREATE OR REPLACE FUNCTION pgflow.%1$I(p_flow_slug text, p_qty integer, p_vt integer)
RETURNS bigint[]
LANGUAGE plpgsql
VOLATILE
%3$s
AS $body$
DECLARE
  v_ids bigint[];
  v_now timestamptz := clock_timestamp();
BEGIN
  WITH next AS (
    SELECT q.msg_id FROM pgmq.%2$I q
     WHERE q.vt <= v_now
     ORDER BY q.vt
     LIMIT p_qty
       FOR UPDATE SKIP LOCKED
  ),
  read AS (
    UPDATE pgmq.%2$I q
       SET vt = clock_timestamp() + make_interval(secs => coalesce(
             (SELECT coalesce(s.opt_timeout, f.opt_timeout) + 2
                FROM pgflow.steps s
                JOIN pgflow.flows f ON f.flow_slug = s.flow_slug
               WHERE s.flow_slug = p_flow_slug
                 AND s.step_slug = q.message ->> 'step_slug'),
             p_vt)),
           read_ct = q.read_ct + 1%4$s
     WHERE q.msg_id = ANY(ARRAY(SELECT next.msg_id FROM next))
    RETURNING q.msg_id
  )
  SELECT array_agg(read.msg_id ORDER BY read.msg_id) INTO v_ids FROM read;
  RETURN v_ids;
END;
$body$$f$, '_queue_read_' || v_queue, v_table, v_settings,
    CASE WHEN v_last_read THEN ', last_read_at = clock_timestamp()' ELSE '' END);

  -- Privileges: none for public, as for every function of the schema; and EXECUTE for
  -- every role that may execute the functions calling them (the send: _start_ready_steps,
  -- the read: _read_and_start), so that roles granted the schema's functions before this
  -- flow existed can run it.
  EXECUTE format('REVOKE ALL ON FUNCTION pgflow.%I(timestamptz[], jsonb[]) FROM public',
                 '_queue_send_' || v_queue);
  EXECUTE format('REVOKE ALL ON FUNCTION pgflow.%I(text, integer, integer) FROM public',
                 '_queue_read_' || v_queue);
  FOR v_grant IN
    SELECT DISTINCT g.signature, acl.grantee::regrole::text AS grantee
      FROM (VALUES
              ('pgflow._start_ready_steps(text, uuid[], text[], boolean, jsonb[])'::regprocedure,
               format('pgflow.%I(timestamptz[], jsonb[])', '_queue_send_' || v_queue)),
              ('pgflow._read_and_start(text, integer, integer, uuid)'::regprocedure,
               format('pgflow.%I(text, integer, integer)', '_queue_read_' || v_queue))
           ) AS g(caller, signature)
      JOIN pg_catalog.pg_proc p ON p.oid = g.caller
     CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) AS acl
     WHERE acl.privilege_type = 'EXECUTE'
       AND acl.grantee <> 0
       AND acl.grantee <> p.proowner
     ORDER BY 1, 2
  LOOP
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', v_grant.signature, v_grant.grantee);
  END LOOP;
END;
$gen$;

-- The name of queue p_queue's function `kind` (_create_queue_functions), or NULL when the
-- queue has none.
CREATE FUNCTION pgflow._queue_function(p_kind text, p_queue text)
RETURNS text
LANGUAGE plpgsql
STABLE
SET search_path = ''
AS $$
DECLARE
  v_name text := '_queue_' || p_kind || '_' || lower(p_queue);
BEGIN
  -- A catalog cache lookup, not a query: this runs on every send and every read. The name
  -- is the generator's alone; were it ever overloaded, to_regproc would say NULL and the
  -- callers would take their dynamic fallbacks, slower but the same.
  IF pg_catalog.to_regproc('pgflow.' || pg_catalog.quote_ident(v_name)) IS NULL THEN
    RETURN NULL;
  END IF;
  RETURN v_name;
END;
$$;

