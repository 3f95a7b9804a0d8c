-- =====================================================================================
-- pgflow engine, migration 0001: schema `pgflow`, its seven tables and its functions.
--
-- The SQL surface (names, columns, defaults, constraint names, parameter names, return
-- types, error texts, event names) is pgflow 0.8.1's, as ../../../shared/spec/sql-api.md
-- states it; the implementation is this project's own. Requires schema `pgmq` (1.5+).
-- Runs inside one transaction (our installer) or as a plain `psql -f` script.
--
-- LOCK ORDER
-- ----------
-- Every function takes row locks in this order and never goes back to an earlier level
-- while holding a later one; that is what rules out deadlocks between workers that
-- start, complete and fail tasks of one run at the same moment:
--
--   1. step_tasks rows being started / completed / failed,
--        sorted by (run_id, step_slug, task_index);
--   2. the step_states rows of those tasks,  sorted by (run_id, step_slug);
--   3. runs rows,                            in run_id order;
--        taken only when a step finishes, when a run fails, or by the internal
--        follow-ups (cascade, start_ready_steps, maybe_complete_run) on their own run;
--        complete_tasks locks every run in which a step of its batch finishes, all
--        at once; _start_ready_steps takes none: its callers hold them (or created
--        the run);
--   4. step_states rows of *other* steps of a run (dependents, ready steps),
--        only while holding that run's row lock;
--   5. pgmq message rows, last of all, sorted by (queue, msg_id).
--
-- Completing a task that does not finish its step therefore locks only its task row
-- and its step state (atomic decrement of remaining_tasks): map tasks and tasks of
-- different steps never queue behind a run-wide lock. The run row is locked only by
-- the task that actually finishes a step, and before that task changes anything, so
-- a run that failed meanwhile is seen and left alone. (pgflow 0.8.1 locked the run
-- first on every completion; the order above keeps its guarantees without that.)
--
-- The order holds per call. A caller that chains several complete_task / fail_task
-- calls in one transaction keeps the earlier calls' locks and can deadlock like any
-- multi-statement transaction: report a batch with complete_tasks instead.
--
-- Hot functions run with plan_cache_mode = force_generic_plan: their statements are
-- primary-key lookups whose generic plans are right, and re-planning them on every call
-- would cost more than running them. They also run with sequential scans, hash joins
-- and merge joins disabled: a backend caches its plans for its lifetime, and a plan
-- made while a table was small (or never analysed) would hash a scan of the whole table
-- against the batch long after the table has grown; key lookups are right at any size.
--
-- Row locks are FOR NO KEY UPDATE (what a plain UPDATE takes): they do not conflict with
-- the KEY SHARE locks that foreign-key checks take on runs / step_states / flows.
--
-- EVENTS
-- ------
-- Besides them, every transaction that queues tasks notifies channel `pgflow_tasks` with
-- the flow slug as payload, once per flow: what workers listen to for wake-ups.
-- Every state change emits one event from pgflow._emit_all, in the transaction making it:
--   * pg_notify on the single channel `pgflow`; the payload is the event's JSON object
--     without `input` / `output` (NOTIFY payloads must stay under 8000 bytes; listeners
--     read outputs from the tables) and with error_message cut to 1000 characters;
--   * realtime.send(payload, event, 'pgflow:run:<run_id>', false) with the full payload
--     when that function exists (Supabase), detected at call time.
-- =====================================================================================

CREATE SCHEMA pgflow;

-- -------------------------------------------------------------------------------------
-- Pure helpers (needed by the check constraints below)
-- -------------------------------------------------------------------------------------

CREATE FUNCTION pgflow.is_valid_slug(slug text)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
SET search_path = ''
AS $$
  SELECT coalesce(
    slug <> ''
      AND length(slug) <= 128
      AND slug ~ '^[a-zA-Z_][a-zA-Z0-9_]*$'
      AND slug <> 'run',   -- `run` is the key of the flow input in every step input
    false
  )
$$;

CREATE FUNCTION pgflow.calculate_retry_delay(base_delay numeric, attempts_count integer)
RETURNS integer
LANGUAGE sql
IMMUTABLE
SET search_path = ''
AS $$
  SELECT floor(base_delay * power(2::numeric, attempts_count))::integer
$$;

-- -------------------------------------------------------------------------------------
-- Definitions: flows, steps, deps
-- -------------------------------------------------------------------------------------

CREATE TABLE pgflow.flows (
  flow_slug        text        NOT NULL,
  opt_max_attempts integer     NOT NULL DEFAULT 3,
  opt_base_delay   integer     NOT NULL DEFAULT 1,
  opt_timeout      integer     NOT NULL DEFAULT 60,
  created_at       timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT flows_pkey PRIMARY KEY (flow_slug),
  CONSTRAINT slug_is_valid CHECK (pgflow.is_valid_slug(flow_slug)),
  CONSTRAINT opt_max_attempts_is_nonnegative CHECK (opt_max_attempts >= 0),
  CONSTRAINT opt_base_delay_is_nonnegative CHECK (opt_base_delay >= 0),
  CONSTRAINT opt_timeout_is_positive CHECK (opt_timeout > 0)
);

CREATE TABLE pgflow.steps (
  flow_slug        text        NOT NULL,
  step_slug        text        NOT NULL,
  step_type        text        NOT NULL DEFAULT 'single',
  step_index       integer     NOT NULL DEFAULT 0,
  deps_count       integer     NOT NULL DEFAULT 0,
  opt_max_attempts integer,
  opt_base_delay   integer,
  opt_timeout      integer,
  opt_start_delay  integer,
  created_at       timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT steps_pkey PRIMARY KEY (flow_slug, step_slug),
  CONSTRAINT steps_flow_slug_step_index_key UNIQUE (flow_slug, step_index),
  CONSTRAINT steps_flow_slug_fkey FOREIGN KEY (flow_slug) REFERENCES pgflow.flows (flow_slug),
  CONSTRAINT steps_step_slug_check CHECK (pgflow.is_valid_slug(step_slug)),
  CONSTRAINT steps_step_type_check CHECK (step_type IN ('single', 'map')),
  CONSTRAINT steps_deps_count_check CHECK (deps_count >= 0),
  CONSTRAINT opt_max_attempts_is_nonnegative CHECK (opt_max_attempts IS NULL OR opt_max_attempts >= 0),
  CONSTRAINT opt_base_delay_is_nonnegative CHECK (opt_base_delay IS NULL OR opt_base_delay >= 0),
  CONSTRAINT opt_timeout_is_positive CHECK (opt_timeout IS NULL OR opt_timeout > 0),
  CONSTRAINT opt_start_delay_is_nonnegative CHECK (opt_start_delay IS NULL OR opt_start_delay >= 0)
);

CREATE TABLE pgflow.deps (
  flow_slug  text        NOT NULL,
  dep_slug   text        NOT NULL,
  step_slug  text        NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT deps_pkey PRIMARY KEY (flow_slug, dep_slug, step_slug),
  CONSTRAINT deps_flow_slug_fkey FOREIGN KEY (flow_slug) REFERENCES pgflow.flows (flow_slug),
  CONSTRAINT deps_flow_slug_dep_slug_fkey FOREIGN KEY (flow_slug, dep_slug)
    REFERENCES pgflow.steps (flow_slug, step_slug),
  CONSTRAINT deps_flow_slug_step_slug_fkey FOREIGN KEY (flow_slug, step_slug)
    REFERENCES pgflow.steps (flow_slug, step_slug),
  CONSTRAINT deps_check CHECK (dep_slug <> step_slug)
);

-- The primary key serves "dependents of a step"; this one serves "dependencies of a step"
-- (building a step's input).
CREATE INDEX idx_deps_by_flow_step ON pgflow.deps (flow_slug, step_slug);

-- -------------------------------------------------------------------------------------
-- Workers
-- -------------------------------------------------------------------------------------

CREATE TABLE pgflow.workers (
  worker_id         uuid        NOT NULL,
  queue_name        text        NOT NULL,
  function_name     text        NOT NULL,
  started_at        timestamptz NOT NULL DEFAULT now(),
  deprecated_at     timestamptz,
  last_heartbeat_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT workers_pkey PRIMARY KEY (worker_id)
);

-- -------------------------------------------------------------------------------------
-- Runtime state: runs, step_states, step_tasks
-- -------------------------------------------------------------------------------------

CREATE TABLE pgflow.runs (
  run_id          uuid        NOT NULL DEFAULT gen_random_uuid(),
  flow_slug       text        NOT NULL,
  status          text        NOT NULL DEFAULT 'started',
  input           jsonb       NOT NULL,
  output          jsonb,
  remaining_steps integer     NOT NULL DEFAULT 0,
  started_at      timestamptz NOT NULL DEFAULT now(),
  completed_at    timestamptz,
  failed_at       timestamptz,
  CONSTRAINT runs_pkey PRIMARY KEY (run_id),
  CONSTRAINT runs_flow_slug_fkey FOREIGN KEY (flow_slug) REFERENCES pgflow.flows (flow_slug),
  CONSTRAINT status_is_valid CHECK (status IN ('started', 'completed', 'failed')),
  CONSTRAINT runs_remaining_steps_check CHECK (remaining_steps >= 0),
  CONSTRAINT completed_at_or_failed_at CHECK (NOT (completed_at IS NOT NULL AND failed_at IS NOT NULL)),
  CONSTRAINT completed_at_is_after_started_at CHECK (completed_at IS NULL OR completed_at >= started_at),
  CONSTRAINT failed_at_is_after_started_at CHECK (failed_at IS NULL OR failed_at >= started_at)
);

-- For the monitoring queries users already run (runs per flow, per status).
CREATE INDEX idx_runs_flow_slug ON pgflow.runs (flow_slug);
CREATE INDEX idx_runs_status ON pgflow.runs (status);

-- step_states and step_tasks rows are updated two or three times each, always by primary
-- key: pages keep 30% free so that the new versions fit beside the old ones (HOT updates,
-- no new index entries).
CREATE TABLE pgflow.step_states (
  flow_slug       text        NOT NULL,
  run_id          uuid        NOT NULL,
  step_slug       text        NOT NULL,
  status          text        NOT NULL DEFAULT 'created',
  remaining_tasks integer,
  initial_tasks   integer,
  remaining_deps  integer     NOT NULL DEFAULT 0,
  error_message   text,
  created_at      timestamptz NOT NULL DEFAULT now(),
  started_at      timestamptz,
  completed_at    timestamptz,
  failed_at       timestamptz,
  CONSTRAINT step_states_pkey PRIMARY KEY (run_id, step_slug),
  CONSTRAINT step_states_run_id_fkey FOREIGN KEY (run_id) REFERENCES pgflow.runs (run_id),
  CONSTRAINT step_states_flow_slug_step_slug_fkey FOREIGN KEY (flow_slug, step_slug)
    REFERENCES pgflow.steps (flow_slug, step_slug),
  CONSTRAINT status_is_valid CHECK (status IN ('created', 'started', 'completed', 'failed')),
  CONSTRAINT step_states_remaining_deps_check CHECK (remaining_deps >= 0),
  CONSTRAINT step_states_initial_tasks_check CHECK (initial_tasks IS NULL OR initial_tasks >= 0),
  CONSTRAINT initial_tasks_known_when_started CHECK (status <> 'started' OR initial_tasks IS NOT NULL),
  CONSTRAINT remaining_tasks_state_consistency CHECK (remaining_tasks IS NULL OR status <> 'created'),
  CONSTRAINT status_and_remaining_tasks_match CHECK (status <> 'completed' OR remaining_tasks = 0),
  CONSTRAINT completed_at_or_failed_at CHECK (NOT (completed_at IS NOT NULL AND failed_at IS NOT NULL)),
  CONSTRAINT started_at_is_after_created_at CHECK (started_at IS NULL OR started_at >= created_at),
  CONSTRAINT completed_at_is_after_started_at CHECK (completed_at IS NULL OR completed_at >= started_at),
  CONSTRAINT failed_at_is_after_started_at CHECK (failed_at IS NULL OR failed_at >= started_at)
) WITH (fillfactor = 70);

-- Deliberately no partial index on status (ready steps, failed steps): a column in an
-- index predicate makes every update of it a non-HOT update, and each step state changes
-- status two or three times; the dead entries such an index gathers under load are what
-- a scan of it then reads. The primary key's run_id prefix finds a run's steps.

CREATE TABLE pgflow.step_tasks (
  flow_slug      text        NOT NULL,
  run_id         uuid        NOT NULL,
  step_slug      text        NOT NULL,
  message_id     bigint,
  task_index     integer     NOT NULL DEFAULT 0,
  status         text        NOT NULL DEFAULT 'queued',
  attempts_count integer     NOT NULL DEFAULT 0,
  error_message  text,
  output         jsonb,
  queued_at      timestamptz NOT NULL DEFAULT now(),
  started_at     timestamptz,
  completed_at   timestamptz,
  failed_at      timestamptz,
  last_worker_id uuid,
  CONSTRAINT step_tasks_pkey PRIMARY KEY (run_id, step_slug, task_index),
  CONSTRAINT step_tasks_run_id_step_slug_fkey FOREIGN KEY (run_id, step_slug)
    REFERENCES pgflow.step_states (run_id, step_slug),
  CONSTRAINT step_tasks_last_worker_id_fkey FOREIGN KEY (last_worker_id)
    REFERENCES pgflow.workers (worker_id) ON DELETE SET NULL,
  CONSTRAINT valid_status CHECK (status IN ('queued', 'started', 'completed', 'failed')),
  CONSTRAINT output_valid_only_for_completed CHECK (output IS NULL OR status IN ('completed', 'failed')),
  CONSTRAINT attempts_count_nonnegative CHECK (attempts_count >= 0),
  CONSTRAINT completed_at_or_failed_at CHECK (NOT (completed_at IS NOT NULL AND failed_at IS NOT NULL)),
  CONSTRAINT started_at_is_after_queued_at CHECK (started_at IS NULL OR started_at >= queued_at),
  CONSTRAINT completed_at_is_after_started_at CHECK (completed_at IS NULL OR completed_at >= started_at),
  CONSTRAINT failed_at_is_after_started_at CHECK (failed_at IS NULL OR failed_at >= started_at)
) WITH (fillfactor = 70);

-- start_tasks finds tasks by the pgmq message ids a worker just read.
CREATE INDEX idx_step_tasks_message_id ON pgflow.step_tasks (message_id);
-- Tasks of a run / of a step: the primary key. Deliberately no partial index on status:
-- status changes on every task transition, and such an index would make every update a
-- non-HOT one and tempt the planner away from primary-key lookups on small tables.

-- What _start_tasks returns: a step_task_record plus what a worker needs to run the task
-- (its attempt number, counting this one, and the step's timeout in seconds).
CREATE TYPE pgflow._started_task AS (
  flow_slug  text,
  run_id     uuid,
  step_slug  text,
  input      jsonb,
  msg_id     bigint,
  task_index integer,
  attempt    integer,
  timeout    integer
);

CREATE TYPE pgflow.step_task_record AS (
  flow_slug  text,
  run_id     uuid,
  step_slug  text,
  input      jsonb,
  msg_id     bigint,
  task_index integer
);

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

-- -------------------------------------------------------------------------------------
-- Definitions API
-- -------------------------------------------------------------------------------------

CREATE FUNCTION pgflow.create_flow(
  flow_slug    text,
  max_attempts integer DEFAULT 3,
  base_delay   integer DEFAULT 5,
  timeout      integer DEFAULT 60
)
RETURNS pgflow.flows
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_flow pgflow.flows;
BEGIN
  INSERT INTO pgflow.flows (flow_slug, opt_max_attempts, opt_base_delay, opt_timeout)
  VALUES (create_flow.flow_slug, create_flow.max_attempts, create_flow.base_delay, create_flow.timeout)
  ON CONFLICT ON CONSTRAINT flows_pkey DO NOTHING
  RETURNING * INTO v_flow;

  IF NOT FOUND THEN
    SELECT * INTO v_flow FROM pgflow.flows f WHERE f.flow_slug = create_flow.flow_slug;
  END IF;

  -- Checked first: pgmq.create would take an advisory lock and run DDL every time.
  IF NOT EXISTS (
    SELECT 1 FROM pgmq.list_queues() q WHERE q.queue_name = create_flow.flow_slug
  ) THEN
    PERFORM pgmq.create(create_flow.flow_slug);
    PERFORM pgflow._create_queue_functions(create_flow.flow_slug);
  ELSIF pgflow._queue_function('read', create_flow.flow_slug) IS NULL
     OR pgflow._queue_function('send', create_flow.flow_slug) IS NULL THEN
    -- A queue made before its flow, or by an installation without these functions.
    PERFORM pgflow._create_queue_functions(create_flow.flow_slug);
  END IF;

  RETURN v_flow;
END;
$$;

CREATE FUNCTION pgflow.add_step(
  flow_slug    text,
  step_slug    text,
  deps_slugs   text[]  DEFAULT '{}',
  max_attempts integer DEFAULT NULL,
  base_delay   integer DEFAULT NULL,
  timeout      integer DEFAULT NULL,
  start_delay  integer DEFAULT NULL,
  step_type    text    DEFAULT 'single'
)
RETURNS pgflow.steps
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_deps text[] := coalesce(add_step.deps_slugs, '{}');
  v_step pgflow.steps;
BEGIN
  IF add_step.step_type = 'map' AND cardinality(v_deps) > 1 THEN
    RAISE EXCEPTION 'Map step "%" can have at most one dependency, but % were provided: %',
      add_step.step_slug, cardinality(v_deps), array_to_string(v_deps, ', ');
  END IF;

  -- Serialises definitions of one flow so step_index stays dense and ordered. An
  -- unknown flow finds no row here and fails on steps_flow_slug_fkey below.
  PERFORM 1 FROM pgflow.flows f WHERE f.flow_slug = add_step.flow_slug FOR NO KEY UPDATE;

  SELECT * INTO v_step
    FROM pgflow.steps s
   WHERE s.flow_slug = add_step.flow_slug
     AND s.step_slug = add_step.step_slug;
  IF FOUND THEN
    RETURN v_step;
  END IF;

  INSERT INTO pgflow.steps (
    flow_slug, step_slug, step_type, step_index, deps_count,
    opt_max_attempts, opt_base_delay, opt_timeout, opt_start_delay
  )
  VALUES (
    add_step.flow_slug, add_step.step_slug, add_step.step_type,
    (SELECT coalesce(max(s.step_index) + 1, 0) FROM pgflow.steps s
      WHERE s.flow_slug = add_step.flow_slug),
    cardinality(v_deps),
    add_step.max_attempts, add_step.base_delay, add_step.timeout, add_step.start_delay
  )
  RETURNING * INTO v_step;

  INSERT INTO pgflow.deps (flow_slug, dep_slug, step_slug)
  SELECT add_step.flow_slug, d.dep_slug, add_step.step_slug
    FROM unnest(v_deps) AS d(dep_slug);

  RETURN v_step;
END;
$$;

-- -------------------------------------------------------------------------------------
-- Queue helper
-- -------------------------------------------------------------------------------------

-- Updates pgmq.q_<queue> directly (one statement, so a missing queue is PostgreSQL's own
-- 42P01), locking the rows in msg_id order (lock level 5).
CREATE FUNCTION pgflow.set_vt_batch(queue_name text, msg_ids bigint[], vt_offsets integer[])
RETURNS TABLE (
  msg_id      bigint,
  read_ct     integer,
  enqueued_at timestamptz,
  vt          timestamptz,
  message     jsonb,
  headers     jsonb
)
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
BEGIN
  IF coalesce(cardinality(set_vt_batch.msg_ids), 0) <> coalesce(cardinality(set_vt_batch.vt_offsets), 0) THEN
    RAISE EXCEPTION 'msg_ids length (%) must equal vt_offsets length (%)',
      coalesce(cardinality(set_vt_batch.msg_ids), 0), coalesce(cardinality(set_vt_batch.vt_offsets), 0);
  END IF;
  IF coalesce(cardinality(set_vt_batch.msg_ids), 0) = 0 THEN
    RETURN;
  END IF;

  RETURN QUERY EXECUTE format(
    $q$
    WITH locked AS (
      SELECT q.msg_id FROM pgmq.%1$I q WHERE q.msg_id = ANY($1) ORDER BY q.msg_id FOR UPDATE
    )
    UPDATE pgmq.%1$I q
       SET vt = clock_timestamp() + make_interval(secs => o.vt_offset)
      FROM locked
      JOIN unnest($1, $2) AS o(msg_id, vt_offset) ON o.msg_id = locked.msg_id
     WHERE q.msg_id = locked.msg_id
    RETURNING q.msg_id, q.read_ct, q.enqueued_at, q.vt, q.message, q.headers
    $q$,
    pgmq.format_table_name(set_vt_batch.queue_name, 'q')
  ) USING set_vt_batch.msg_ids, set_vt_batch.vt_offsets;
END;
$$;

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

-- -------------------------------------------------------------------------------------
-- Starting runs
-- -------------------------------------------------------------------------------------

CREATE FUNCTION pgflow.start_flow(flow_slug text, input jsonb, run_id uuid DEFAULT NULL)
RETURNS SETOF pgflow.runs
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_step_count    integer;
  v_roots         text[];
  v_has_root_map  boolean;
  v_root_tasks    integer;
  v_run           pgflow.runs;
  v_started       jsonb;
BEGIN
  SELECT count(*)::integer, coalesce(bool_or(s.step_type = 'map' AND s.deps_count = 0), false),
         array_agg(s.step_slug) FILTER (WHERE s.deps_count = 0)
    INTO v_step_count, v_has_root_map, v_roots
    FROM pgflow.steps s
   WHERE s.flow_slug = start_flow.flow_slug;

  IF v_has_root_map THEN
    IF start_flow.input IS NULL THEN
      RAISE EXCEPTION 'Flow % has root map steps but input is NULL', start_flow.flow_slug;
    END IF;
    IF jsonb_typeof(start_flow.input) <> 'array' THEN
      RAISE EXCEPTION 'Flow % has root map steps but input is not an array (got %)',
        start_flow.flow_slug, jsonb_typeof(start_flow.input);
    END IF;
    -- Computed here, not in the INSERT's CASE: the planner folds constant calls in
    -- every CASE branch and would take the length of a non-array input.
    v_root_tasks := jsonb_array_length(start_flow.input);
  END IF;

  INSERT INTO pgflow.runs (run_id, flow_slug, input, remaining_steps)
  VALUES (coalesce(start_flow.run_id, gen_random_uuid()), start_flow.flow_slug,
          start_flow.input, v_step_count)
  RETURNING * INTO v_run;

  -- Roots are inserted started, unless an empty root map sends the run through the
  -- cascade below: every root then has tasks (a single step one, a root map the input's
  -- length).
  INSERT INTO pgflow.step_states (flow_slug, run_id, step_slug, remaining_deps, initial_tasks,
                                  status, started_at, remaining_tasks)
  SELECT s.flow_slug, v_run.run_id, s.step_slug, s.deps_count, n.tasks,
         CASE WHEN n.starts THEN 'started' ELSE 'created' END,
         CASE WHEN n.starts THEN now() END,
         CASE WHEN n.starts THEN n.tasks END
    FROM pgflow.steps s
   CROSS JOIN LATERAL (
     SELECT CASE
              WHEN s.step_type = 'single' THEN 1
              WHEN s.deps_count = 0 THEN v_root_tasks
            END AS tasks,
            s.deps_count = 0 AND v_root_tasks IS DISTINCT FROM 0 AS starts
   ) n
   WHERE s.flow_slug = start_flow.flow_slug;

  v_started := jsonb_build_object(
    'event_type', 'run:started',
    'run_id', v_run.run_id,
    'flow_slug', v_run.flow_slug,
    'status', 'started',
    'started_at', v_run.started_at,
    'input', v_run.input
  );

  -- Only an empty root map makes a taskless step at start (a dependent map learns its
  -- count later): then the full path with its cascade, else start the roots directly,
  -- with run:started in the same call as their step:started events.
  -- Nobody else sees the new run yet, so its row needs no lock here.
  IF v_root_tasks = 0 THEN
    PERFORM pgflow._emit(v_started);
    PERFORM pgflow.start_ready_steps(v_run.run_id);
  ELSIF v_roots IS NOT NULL THEN
    PERFORM pgflow._start_ready_steps(
      v_run.flow_slug, array_fill(v_run.run_id, ARRAY[cardinality(v_roots)]), v_roots, true,
      ARRAY[v_started]);
  ELSE
    PERFORM pgflow._emit(v_started);
  END IF;
  IF v_root_tasks = 0 OR v_step_count = 0 THEN
    PERFORM pgflow.maybe_complete_run(v_run.run_id);
    RETURN QUERY SELECT * FROM pgflow.runs r WHERE r.run_id = v_run.run_id;
    RETURN;
  END IF;

  -- Starting root steps leaves the run's row as inserted.
  RETURN NEXT v_run;
END;
$$;

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

-- -------------------------------------------------------------------------------------
-- Reading
-- -------------------------------------------------------------------------------------

CREATE FUNCTION pgflow.get_run_with_states(run_id uuid)
RETURNS jsonb
LANGUAGE sql
STABLE
SET search_path = ''
AS $$
  SELECT jsonb_build_object(
           'run', to_jsonb(r),
           'steps', coalesce((
             SELECT jsonb_agg(to_jsonb(ss) ORDER BY s.step_index)
               FROM pgflow.step_states ss
               JOIN pgflow.steps s ON s.flow_slug = ss.flow_slug AND s.step_slug = ss.step_slug
              WHERE ss.run_id = r.run_id), '[]'::jsonb))
    FROM pgflow.runs r
   WHERE r.run_id = get_run_with_states.run_id
$$;

CREATE FUNCTION pgflow.start_flow_with_states(flow_slug text, input jsonb, run_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_run_id uuid;
BEGIN
  SELECT r.run_id INTO v_run_id
    FROM pgflow.start_flow(start_flow_with_states.flow_slug, start_flow_with_states.input,
                           start_flow_with_states.run_id) r;
  RETURN pgflow.get_run_with_states(v_run_id);
END;
$$;

CREATE FUNCTION pgflow.poll_for_tasks(
  queue_name       text,
  vt               integer,
  qty              integer,
  max_poll_seconds integer DEFAULT 5,
  poll_interval_ms integer DEFAULT 100
)
RETURNS SETOF pgflow.step_task_record
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
BEGIN
  RAISE NOTICE 'pgflow.poll_for_tasks is deprecated since pgflow 0.8 and returns no tasks: '
               'use pgmq.read_with_poll followed by pgflow.start_tasks';
  RETURN;
END;
$$;

-- -------------------------------------------------------------------------------------
-- Privileges: nothing for public; the installer (or the user) grants explicitly.
-- -------------------------------------------------------------------------------------

REVOKE ALL ON SCHEMA pgflow FROM public;
REVOKE ALL ON ALL TABLES IN SCHEMA pgflow FROM public;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgflow FROM public;
