-- =====================================================================================
-- pgflow engine, migration 0009: schedules and delayed starts.
--
-- No pgflow version has these; the names follow the engine's style and everything is
-- additive to the 0.8.1 surface (docs/sql-api.md, "Schedules").
--
-- SCHEDULES
-- ---------
-- pgflow_ext.schedules holds one row per schedule: a flow, a cron expression read in a
-- time zone, an input, a missed-tick policy, and its state (paused, the last tick fired).
-- The cron expression is parsed by the Rust worker that fires the schedule, not here: the
-- database stores it for listing (`pgflow schedules`), and a worker writes its schedules
-- with define_schedule when it starts.
--
-- EXACTLY ONE RUN PER TICK
-- ------------------------
-- The run of tick T of schedule S has the id schedule_run_id(S, T), a name-based UUID
-- computed from the two (md5, version 3): firing a tick twice, by one worker or by two,
-- names the same run. start_scheduled_run locks the schedule's row, starts the run only
-- when no run has that id, and moves last_fired_tick forward, all in one transaction.
-- Which worker fires is settled outside the engine: the one holding the session-level
-- advisory lock schedule_lock_key(S) (docs/operating.md, "Schedules").
--
-- DELAYED STARTS
-- --------------
-- start_flow_at starts a run as start_flow does (the run, its step states, its root
-- tasks and their messages exist at once: the run can be read and cancelled) but its root
-- tasks' messages become visible at start_at (plus each root step's start_delay) instead
-- of now. runs.scheduled_for records start_at when it lies in the future, and run:started
-- carries it. start_flow and start_flow_at share one body, _start_flow.
-- =====================================================================================

-- -------------------------------------------------------------------------------------
-- Delayed starts
-- -------------------------------------------------------------------------------------

ALTER TABLE pgflow.runs
  ADD COLUMN scheduled_for timestamptz,
  ADD CONSTRAINT scheduled_for_is_after_started_at
    CHECK (scheduled_for IS NULL OR scheduled_for > started_at);

-- 0005's start_flow, with a start time: p_start_at NULL or not after now() starts the
-- roots at once, exactly as before; a later one records it in runs.scheduled_for and in
-- run:started, and hides the root tasks' messages until then. The new messages are this
-- transaction's own, so nobody can read them before their visibility is moved.
CREATE FUNCTION pgflow._start_flow(
  p_flow_slug text, p_input jsonb, p_run_id uuid, p_start_at timestamptz
)
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
  v_scheduled     timestamptz;
  v_msgs          bigint[];
  v_delays        integer[];
BEGIN
  IF p_start_at > now() THEN
    v_scheduled := p_start_at;
  END IF;

  SELECT count(*)::integer, coalesce(bool_or(s.step_type = 'map' AND s.deps_count = 0), false),
         array_agg(s.step_slug) FILTER (WHERE s.deps_count = 0)
    INTO v_step_count, v_has_root_map, v_roots
    FROM pgflow.steps s
   WHERE s.flow_slug = p_flow_slug;

  IF v_has_root_map THEN
    IF p_input IS NULL THEN
      RAISE EXCEPTION 'Flow % has root map steps but input is NULL', p_flow_slug;
    END IF;
    IF jsonb_typeof(p_input) <> 'array' THEN
      RAISE EXCEPTION 'Flow % has root map steps but input is not an array (got %)',
        p_flow_slug, jsonb_typeof(p_input);
    END IF;
    -- Computed here, not in the INSERT's CASE: the planner folds constant calls in
    -- every CASE branch and would take the length of a non-array input.
    v_root_tasks := jsonb_array_length(p_input);
  END IF;

  INSERT INTO pgflow.runs (run_id, flow_slug, input, remaining_steps, scheduled_for)
  VALUES (coalesce(p_run_id, gen_random_uuid()), p_flow_slug, p_input, v_step_count,
          v_scheduled)
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
   WHERE s.flow_slug = p_flow_slug;

  -- remaining_steps as inserted: every step of the flow, before any empty map completes.
  -- scheduled_for only for a delayed run: 0.8.1's payload otherwise.
  v_started := jsonb_build_object(
    'event_type', 'run:started',
    'run_id', v_run.run_id,
    'flow_slug', v_run.flow_slug,
    'status', 'started',
    'started_at', v_run.started_at,
    'remaining_steps', v_run.remaining_steps,
    'input', v_run.input
  ) || CASE WHEN v_scheduled IS NULL THEN '{}'::jsonb
            ELSE jsonb_build_object('scheduled_for', v_scheduled) END;

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

  -- A delayed run: its tasks so far are its roots'; their messages become visible at
  -- the start time plus each step's start_delay, as they would have at now() plus it.
  IF v_scheduled IS NOT NULL THEN
    SELECT array_agg(t.message_id ORDER BY t.message_id),
           array_agg(coalesce(s.opt_start_delay, 0) ORDER BY t.message_id)
      INTO v_msgs, v_delays
      FROM pgflow.step_tasks t
      JOIN pgflow.steps s ON s.flow_slug = t.flow_slug AND s.step_slug = t.step_slug
     WHERE t.run_id = v_run.run_id
       AND t.message_id IS NOT NULL;
    IF v_msgs IS NOT NULL THEN
      EXECUTE format(
        'UPDATE pgmq.%I q SET vt = $2 + make_interval(secs => d.delay)'
        '  FROM unnest($1, $3) AS d(msg_id, delay) WHERE q.msg_id = d.msg_id',
        'q_' || lower(p_flow_slug))
        USING v_msgs, v_scheduled, v_delays;
    END IF;
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

-- 0005's start_flow, now _start_flow's without a start time. Its attributes as before
-- (SECURITY DEFINER since 0004): CREATE OR REPLACE keeps its owner and grants.
CREATE OR REPLACE FUNCTION pgflow.start_flow(flow_slug text, input jsonb, run_id uuid DEFAULT NULL)
RETURNS SETOF pgflow.runs
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
  RETURN QUERY
  SELECT * FROM pgflow._start_flow(start_flow.flow_slug, start_flow.input, start_flow.run_id,
                                   NULL::timestamptz);
END;
$$;

-- Starts a run whose root steps start at start_at (see DELAYED STARTS above). A start_at
-- that is NULL or not in the future starts it at once, as start_flow does.
CREATE FUNCTION pgflow.start_flow_at(
  flow_slug text, input jsonb, start_at timestamptz, run_id uuid DEFAULT NULL
)
RETURNS SETOF pgflow.runs
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
  RETURN QUERY
  SELECT * FROM pgflow._start_flow(start_flow_at.flow_slug, start_flow_at.input,
                                   start_flow_at.run_id, start_flow_at.start_at);
END;
$$;

-- -------------------------------------------------------------------------------------
-- Schedules
-- -------------------------------------------------------------------------------------

CREATE TABLE pgflow_ext.schedules (
  schedule_name   text        NOT NULL,
  flow_slug       text        NOT NULL,
  cron            text        NOT NULL,
  timezone        text        NOT NULL DEFAULT 'UTC',
  -- The input of every run; NULL when the worker computes it per tick.
  input           jsonb,
  missed          text        NOT NULL DEFAULT 'skip',
  catch_up_max    integer     NOT NULL DEFAULT 0,
  grace_seconds   integer     NOT NULL DEFAULT 60,
  paused          boolean     NOT NULL DEFAULT false,
  paused_at       timestamptz,
  resumed_at      timestamptz,
  last_fired_tick timestamptz,
  last_run_id     uuid,
  created_at      timestamptz NOT NULL DEFAULT now(),
  updated_at      timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT schedules_pkey PRIMARY KEY (schedule_name),
  -- Deferred: compile_replacing deletes a flow and creates it again in one transaction.
  -- Deleting a flow for good while a schedule names it fails at commit.
  CONSTRAINT schedules_flow_slug_fkey FOREIGN KEY (flow_slug)
    REFERENCES pgflow.flows (flow_slug) DEFERRABLE INITIALLY DEFERRED,
  CONSTRAINT schedule_name_is_valid
    CHECK (length(schedule_name) BETWEEN 1 AND 128 AND schedule_name !~ '[[:cntrl:]]'),
  CONSTRAINT cron_is_not_empty CHECK (btrim(cron) <> ''),
  CONSTRAINT missed_is_valid CHECK (missed IN ('skip', 'catch_up')),
  CONSTRAINT catch_up_max_is_valid CHECK (catch_up_max BETWEEN 0 AND 10000),
  CONSTRAINT grace_seconds_is_nonnegative CHECK (grace_seconds >= 0),
  CONSTRAINT paused_at_when_paused CHECK (paused = (paused_at IS NOT NULL))
);

REVOKE ALL ON TABLE pgflow_ext.schedules FROM public;

-- The id of the run of tick `tick` of schedule `schedule_name`: a name-based UUID (md5,
-- version 3) of 'pgflow.schedule:<name>@<tick in microseconds since the Unix epoch>'.
-- The digits after the last '@' are the tick, so distinct pairs give distinct names.
CREATE FUNCTION pgflow.schedule_run_id(schedule_name text, tick timestamptz)
RETURNS uuid
LANGUAGE sql
IMMUTABLE
STRICT
PARALLEL SAFE
SET search_path = ''
AS $$
  SELECT (substr(h, 1, 12) || '3' || substr(h, 14, 3)
          || substr('89ab', (('x' || substr(h, 17, 1))::bit(4)::integer & 3) + 1, 1)
          || substr(h, 18, 15))::uuid
    FROM (SELECT pg_catalog.md5('pgflow.schedule:' || schedule_name || '@'
                                || floor(extract(epoch FROM tick) * 1000000)::bigint::text)
                 AS h) x
$$;

-- The key of the session-level advisory lock (pg_try_advisory_lock(bigint)) that the
-- worker firing schedule `schedule_name` holds: the first 64 bits of
-- md5('pgflow.schedule.lock:<name>').
CREATE FUNCTION pgflow.schedule_lock_key(schedule_name text)
RETURNS bigint
LANGUAGE sql
IMMUTABLE
STRICT
PARALLEL SAFE
SET search_path = ''
AS $$
  SELECT ('x' || substr(pg_catalog.md5('pgflow.schedule.lock:' || schedule_name), 1, 16))
           ::bit(64)::bigint
$$;

-- Creates schedule `schedule_name`, or updates its definition (flow, cron, time zone,
-- input, missed-tick policy): its state (paused, last fired tick) stays. Returns true
-- when it created the schedule.
CREATE FUNCTION pgflow.define_schedule(
  schedule_name text,
  flow_slug     text,
  cron          text,
  timezone      text DEFAULT 'UTC',
  input         jsonb DEFAULT '{}',
  missed        text DEFAULT 'skip',
  catch_up_max  integer DEFAULT 0,
  grace_seconds integer DEFAULT 60
)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_created boolean;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pgflow.flows f WHERE f.flow_slug = define_schedule.flow_slug) THEN
    RAISE EXCEPTION 'flow % not found', define_schedule.flow_slug USING ERRCODE = 'no_data_found';
  END IF;
  INSERT INTO pgflow_ext.schedules AS s
    (schedule_name, flow_slug, cron, timezone, input, missed, catch_up_max, grace_seconds)
  VALUES
    (define_schedule.schedule_name, define_schedule.flow_slug, define_schedule.cron,
     define_schedule.timezone, define_schedule.input, define_schedule.missed,
     define_schedule.catch_up_max, define_schedule.grace_seconds)
  ON CONFLICT ON CONSTRAINT schedules_pkey DO UPDATE
     SET flow_slug = excluded.flow_slug,
         cron = excluded.cron,
         timezone = excluded.timezone,
         input = excluded.input,
         missed = excluded.missed,
         catch_up_max = excluded.catch_up_max,
         grace_seconds = excluded.grace_seconds,
         updated_at = now()
   WHERE (s.flow_slug, s.cron, s.timezone, s.missed, s.catch_up_max, s.grace_seconds)
         IS DISTINCT FROM
         (excluded.flow_slug, excluded.cron, excluded.timezone, excluded.missed,
          excluded.catch_up_max, excluded.grace_seconds)
      OR s.input IS DISTINCT FROM excluded.input
  RETURNING (xmax = 0) INTO v_created;
  RETURN coalesce(v_created, false);
END;
$$;

-- Starts the run of tick `tick` of schedule `schedule_name`, once: run_id is
-- schedule_run_id(schedule_name, tick) and `started` says whether this call started it
-- (false when that run exists already). The run's input is `input`, else the schedule's.
-- A paused schedule starts nothing: run_id NULL, started false. last_fired_tick moves
-- forward to `tick` (never back).
CREATE FUNCTION pgflow.start_scheduled_run(
  schedule_name text, tick timestamptz, input jsonb DEFAULT NULL,
  OUT run_id uuid, OUT started boolean
)
RETURNS record
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_schedule pgflow_ext.schedules;
  v_input    jsonb;
BEGIN
  IF start_scheduled_run.tick IS NULL THEN
    RAISE EXCEPTION 'tick must not be NULL' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  -- One firing of a schedule at a time: a second caller of the same tick waits here, then
  -- finds the run.
  SELECT * INTO v_schedule
    FROM pgflow_ext.schedules s
   WHERE s.schedule_name = start_scheduled_run.schedule_name
     FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'schedule % not found', start_scheduled_run.schedule_name
      USING ERRCODE = 'no_data_found';
  END IF;
  started := false;
  IF v_schedule.paused THEN
    RAISE NOTICE 'schedule % is paused: tick % not fired', v_schedule.schedule_name,
      start_scheduled_run.tick;
    RETURN;
  END IF;

  run_id := pgflow.schedule_run_id(v_schedule.schedule_name, start_scheduled_run.tick);
  IF NOT EXISTS (SELECT 1 FROM pgflow.runs r WHERE r.run_id = start_scheduled_run.run_id) THEN
    v_input := coalesce(start_scheduled_run.input, v_schedule.input);
    IF v_input IS NULL THEN
      RAISE EXCEPTION 'schedule % stores no input: pass the input of tick %',
        v_schedule.schedule_name, start_scheduled_run.tick
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM 1 FROM pgflow._start_flow(v_schedule.flow_slug, v_input,
                                      start_scheduled_run.run_id, NULL::timestamptz);
    started := true;
  END IF;

  UPDATE pgflow_ext.schedules s
     SET last_fired_tick = start_scheduled_run.tick,
         last_run_id = start_scheduled_run.run_id
   WHERE s.schedule_name = v_schedule.schedule_name
     AND (s.last_fired_tick IS NULL OR s.last_fired_tick < start_scheduled_run.tick);
END;
$$;

-- Pauses a schedule: no tick fires until it is resumed. Returns true when this call
-- paused it, false when it was paused already.
CREATE FUNCTION pgflow.pause_schedule(schedule_name text)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_paused boolean;
BEGIN
  SELECT s.paused INTO v_paused
    FROM pgflow_ext.schedules s
   WHERE s.schedule_name = pause_schedule.schedule_name
     FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'schedule % not found', pause_schedule.schedule_name
      USING ERRCODE = 'no_data_found';
  END IF;
  IF v_paused THEN
    RETURN false;
  END IF;
  UPDATE pgflow_ext.schedules s
     SET paused = true, paused_at = now()
   WHERE s.schedule_name = pause_schedule.schedule_name;
  RETURN true;
END;
$$;

-- Resumes a paused schedule. Ticks that fell while it was paused never fire, under either
-- missed-tick policy: resumed_at marks where firing starts again. Returns true when this
-- call resumed it, false when it was not paused.
CREATE FUNCTION pgflow.resume_schedule(schedule_name text)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_paused boolean;
BEGIN
  SELECT s.paused INTO v_paused
    FROM pgflow_ext.schedules s
   WHERE s.schedule_name = resume_schedule.schedule_name
     FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'schedule % not found', resume_schedule.schedule_name
      USING ERRCODE = 'no_data_found';
  END IF;
  IF NOT v_paused THEN
    RETURN false;
  END IF;
  UPDATE pgflow_ext.schedules s
     SET paused = false, paused_at = NULL, resumed_at = now()
   WHERE s.schedule_name = resume_schedule.schedule_name;
  RETURN true;
END;
$$;

-- Deletes a schedule (its runs stay). A worker that still defines it writes it again when
-- it next starts. Returns true when there was one.
CREATE FUNCTION pgflow.delete_schedule(schedule_name text)
RETURNS boolean
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
  WITH deleted AS (
    DELETE FROM pgflow_ext.schedules s
     WHERE s.schedule_name = delete_schedule.schedule_name
    RETURNING 1
  )
  SELECT EXISTS (SELECT 1 FROM deleted)
$$;

-- -------------------------------------------------------------------------------------
-- Privileges: the owner's until granted (docs/security.md)
-- -------------------------------------------------------------------------------------

REVOKE EXECUTE ON FUNCTION
  pgflow.schedule_run_id(text, timestamptz),
  pgflow.schedule_lock_key(text),
  pgflow._start_flow(text, jsonb, uuid, timestamptz),
  pgflow.start_flow_at(text, jsonb, timestamptz, uuid),
  pgflow.define_schedule(text, text, text, text, jsonb, text, integer, integer),
  pgflow.start_scheduled_run(text, timestamptz, jsonb),
  pgflow.pause_schedule(text),
  pgflow.resume_schedule(text),
  pgflow.delete_schedule(text)
  FROM public;

-- Whoever may start runs with start_flow may start delayed ones: applications granted
-- before this migration can use start_flow_at.
DO $$
DECLARE
  v_grantee name;
BEGIN
  FOR v_grantee IN
    SELECT DISTINCT pg_catalog.pg_get_userbyid(a.grantee)
      FROM pg_catalog.pg_proc p
     CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) a
     WHERE p.oid = 'pgflow.start_flow(text, jsonb, uuid)'::regprocedure
       AND a.privilege_type = 'EXECUTE'
       AND a.grantee <> 0
       AND a.grantee <> p.proowner
  LOOP
    EXECUTE format('GRANT EXECUTE ON FUNCTION '
                   'pgflow.start_flow_at(text, jsonb, timestamptz, uuid) TO %I', v_grantee);
  END LOOP;
END;
$$;
