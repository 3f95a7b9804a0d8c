-- =====================================================================================
-- pgflow engine, migration 0010: conditions, skip modes, stored step outputs, stalled
-- tasks and failed runs, as pgflow 0.13-0.15 define them (docs/sql-api.md, "Conditions
-- and skips", "Stored outputs", "Stalled tasks").
--
-- Upstream's names, columns, constraint names, defaults, skip reasons, events and error
-- texts; every addition is additive to the 0.8.1 surface (add_step's eight positional
-- arguments keep their meaning, four named ones follow).
--
-- CONDITIONS
-- ----------
-- A step's condition is met when (required IS NULL OR input @> required) AND (forbidden IS
-- NULL OR NOT input @> forbidden), where input is the run input for a root step and, for a
-- dependent step, the object of its completed dependencies' outputs keyed by slug.
-- cascade_resolve_conditions decides every ready step of a run that has a condition, again
-- and again until nothing changes; it runs wherever steps become ready with a condition
-- among them: at start_flow, after completions, after skips. Unmet, by when_unmet:
--   fail          the step and the run fail ('Condition not met');
--   skip          the step is skipped (skip_reason 'condition_unmet'); its dependents no
--                 longer wait for it and do not see it in their input; a map whose only
--                 dependency was skipped has nothing to map over (0 tasks, output []);
--   skip-cascade  the step and every step downstream of it are skipped (those with
--                 skip_reason 'dependency_skipped').
-- A task whose attempts are exhausted, by its step's when_exhausted: 'fail' as in 0.8.1,
-- or 'skip' / 'skip-cascade' of its step (skip_reason 'handler_failed'): the run goes on.
-- A run completes when every step is completed or skipped; its output holds the completed
-- leaves.
--
-- STORED OUTPUTS
-- --------------
-- step_states.output is written when a step completes: a single step's task output, a map
-- step's task outputs in task_index order ([] for none). Dependents' inputs and the run
-- output read it instead of gathering task rows again.
--
-- FAILED RUNS
-- -----------
-- When a run fails, its queued and started tasks become 'cancelled' and their messages
-- go to the archive. A task locked right then by a worker reporting it (lock level 1,
-- which the failing side, holding the run, must not wait for) is cancelled by that report
-- instead: a started task whose run failed, or whose step was skipped, is cancelled when
-- reported, never completed.
-- A message locked right then by a worker's read (_read_and_start locks the message
-- before its task) is not waited for either: the reader finds the task cancelled and
-- archives the message (_cancel_tasks_of).
--
-- RETRY
-- -----
-- 0007's retry, restated at the end: skipped steps stay skipped; a step failed by its
-- condition is decided again (and fails again: its input is the same).
--
-- STALLED TASKS
-- -------------
-- A started task whose attempt was not reported within its timeout lost its worker. Two
-- paths notice it, whichever comes first, and both count the lost attempt as an attempt:
-- the task's message comes back to a reader after timeout + 2 s (0001, _start_tasks), or
-- requeue_stalled_tasks finds it 30 s after the timeout (its message archived, or no
-- reader took it). See requeue_stalled_tasks below.
--
-- Lock order: 0001's header (tasks, step states, runs, then messages) holds.
-- =====================================================================================

-- -------------------------------------------------------------------------------------
-- Tables
-- -------------------------------------------------------------------------------------

ALTER TABLE pgflow.steps
  ADD COLUMN required_input_pattern  jsonb,
  ADD COLUMN forbidden_input_pattern jsonb,
  ADD COLUMN when_unmet              text NOT NULL DEFAULT 'skip',
  ADD COLUMN when_exhausted          text NOT NULL DEFAULT 'fail',
  ADD CONSTRAINT required_input_pattern_is_object
    CHECK (required_input_pattern IS NULL OR jsonb_typeof(required_input_pattern) = 'object'),
  ADD CONSTRAINT forbidden_input_pattern_is_object
    CHECK (forbidden_input_pattern IS NULL OR jsonb_typeof(forbidden_input_pattern) = 'object'),
  ADD CONSTRAINT when_unmet_is_valid CHECK (when_unmet IN ('fail', 'skip', 'skip-cascade')),
  ADD CONSTRAINT when_exhausted_is_valid CHECK (when_exhausted IN ('fail', 'skip', 'skip-cascade'));

ALTER TABLE pgflow.step_states
  ADD COLUMN skip_reason text,
  ADD COLUMN skipped_at  timestamptz,
  ADD COLUMN output      jsonb,
  DROP CONSTRAINT status_is_valid,
  ADD CONSTRAINT status_is_valid
    CHECK (status IN ('created', 'started', 'completed', 'failed', 'skipped', 'cancelled')),
  DROP CONSTRAINT completed_at_or_failed_at,
  ADD CONSTRAINT completed_at_or_failed_at_or_skipped_at
    CHECK ((completed_at IS NOT NULL)::integer + (failed_at IS NOT NULL)::integer
           + (skipped_at IS NOT NULL)::integer <= 1),
  ADD CONSTRAINT skip_reason_matches_status CHECK ((status = 'skipped') = (skip_reason IS NOT NULL)),
  -- Ours: the three reasons this engine writes, so a typo in a caller cannot invent one.
  ADD CONSTRAINT skip_reason_is_valid
    CHECK (skip_reason IN ('condition_unmet', 'dependency_skipped', 'handler_failed')),
  ADD CONSTRAINT skipped_at_is_after_created_at CHECK (skipped_at IS NULL OR skipped_at >= created_at),
  DROP CONSTRAINT remaining_tasks_state_consistency,
  ADD CONSTRAINT remaining_tasks_state_consistency
    CHECK (remaining_tasks IS NULL OR status NOT IN ('created', 'skipped')),
  ADD CONSTRAINT output_only_when_completed CHECK (output IS NULL OR status = 'completed');

-- Upstream also indexes skipped step states (a partial index on status). Not here: a
-- status in an index predicate makes every status update a non-HOT one (0001, step_states),
-- and a run's skipped steps are found by its primary key prefix.

ALTER TABLE pgflow.step_tasks
  ADD COLUMN requeued_count         integer NOT NULL DEFAULT 0,
  ADD COLUMN last_requeued_at       timestamptz,
  ADD COLUMN permanently_stalled_at timestamptz,
  ADD CONSTRAINT requeued_count_nonnegative CHECK (requeued_count >= 0);

-- Runs that can still read their completed steps' outputs get them stored: started runs
-- go on, failed and cancelled ones may be retried. A completed run has its output.
UPDATE pgflow.step_states ss
   SET output = pgflow._step_output(ss.run_id, ss.step_slug, s.step_type)
  FROM pgflow.steps s, pgflow.runs r
 WHERE s.flow_slug = ss.flow_slug
   AND s.step_slug = ss.step_slug
   AND r.run_id = ss.run_id
   AND r.status <> 'completed'
   AND ss.status = 'completed';

-- -------------------------------------------------------------------------------------
-- Privileges carried over
-- -------------------------------------------------------------------------------------

-- Grants EXECUTE on p_to to every role that has it on p_from (the owner and PUBLIC
-- aside): a function that replaces or joins another keeps the callers it had. Migrations
-- 0007 and 0009 spelled this out in place; later ones call this.
CREATE FUNCTION pgflow._copy_execute_grants(p_from regprocedure, p_to regprocedure)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_grantee name;
BEGIN
  FOR v_grantee IN
    SELECT DISTINCT pg_catalog.pg_get_userbyid(a.grantee)
      FROM pg_catalog.pg_proc p
     CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) a
     WHERE p.oid = p_from
       AND a.privilege_type = 'EXECUTE'
       AND a.grantee <> 0
       AND a.grantee <> p.proowner
     ORDER BY 1
  LOOP
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', p_to::text, v_grantee);
  END LOOP;
END;
$$;

REVOKE EXECUTE ON FUNCTION pgflow._copy_execute_grants(regprocedure, regprocedure) FROM public;

-- -------------------------------------------------------------------------------------
-- Definitions: add_step with conditions
-- -------------------------------------------------------------------------------------

-- 0003's add_step with upstream 0.14's four trailing parameters. The eight-argument form
-- is dropped (a call with up to eight arguments now lands here, with the same meaning):
-- two overloads would make every call that omits the new arguments ambiguous. The new
-- values are checked by the table's constraints, whose names say what was wrong.
CREATE FUNCTION pgflow.add_step(
  flow_slug               text,
  step_slug               text,
  deps_slugs              text[]  DEFAULT '{}',
  max_attempts            integer DEFAULT NULL,
  base_delay              integer DEFAULT NULL,
  timeout                 integer DEFAULT NULL,
  start_delay             integer DEFAULT NULL,
  step_type               text    DEFAULT 'single',
  required_input_pattern  jsonb   DEFAULT NULL,
  forbidden_input_pattern jsonb   DEFAULT NULL,
  when_unmet              text    DEFAULT 'skip',
  when_exhausted          text    DEFAULT 'fail'
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
  PERFORM pgflow._check_option_bounds(
    format('step "%s" of flow "%s"', add_step.step_slug, add_step.flow_slug),
    add_step.max_attempts, add_step.base_delay, add_step.timeout, add_step.start_delay);

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
    opt_max_attempts, opt_base_delay, opt_timeout, opt_start_delay,
    required_input_pattern, forbidden_input_pattern, when_unmet, when_exhausted
  )
  VALUES (
    add_step.flow_slug, add_step.step_slug, add_step.step_type,
    (SELECT coalesce(max(s.step_index) + 1, 0) FROM pgflow.steps s
      WHERE s.flow_slug = add_step.flow_slug),
    cardinality(v_deps),
    add_step.max_attempts, add_step.base_delay, add_step.timeout, add_step.start_delay,
    add_step.required_input_pattern, add_step.forbidden_input_pattern,
    add_step.when_unmet, add_step.when_exhausted
  )
  RETURNING * INTO v_step;

  INSERT INTO pgflow.deps (flow_slug, dep_slug, step_slug)
  SELECT add_step.flow_slug, d.dep_slug, add_step.step_slug
    FROM unnest(v_deps) AS d(dep_slug);

  RETURN v_step;
END;
$$;

REVOKE EXECUTE ON FUNCTION
  pgflow.add_step(text, text, text[], integer, integer, integer, integer, text, jsonb, jsonb, text, text)
  FROM public;
SELECT pgflow._copy_execute_grants(
  'pgflow.add_step(text, text, text[], integer, integer, integer, integer, text)',
  'pgflow.add_step(text, text, text[], integer, integer, integer, integer, text, jsonb, jsonb, text, text)');
DROP FUNCTION pgflow.add_step(text, text, text[], integer, integer, integer, integer, text);

-- -------------------------------------------------------------------------------------
-- Conditions
-- -------------------------------------------------------------------------------------

-- Whether input meets a step's condition (upstream 0.14's rule).
CREATE FUNCTION pgflow._condition_met(p_input jsonb, p_required jsonb, p_forbidden jsonb)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
SET search_path = ''
AS $$
  SELECT (p_required IS NULL OR coalesce(p_input @> p_required, false))
     AND (p_forbidden IS NULL OR NOT coalesce(p_input @> p_forbidden, false))
$$;

-- What a dependent step's condition looks at: its completed dependencies' stored outputs
-- keyed by slug (a skipped dependency is absent).
CREATE FUNCTION pgflow._deps_output(p_run_id uuid, p_flow_slug text, p_step_slug text)
RETURNS jsonb
LANGUAGE sql
STABLE
SET search_path = ''
AS $$
  SELECT coalesce(jsonb_object_agg(d.dep_slug, ps.output), '{}'::jsonb)
    FROM pgflow.deps d
    JOIN pgflow.step_states ps ON ps.run_id = p_run_id AND ps.step_slug = d.dep_slug
   WHERE d.flow_slug = p_flow_slug
     AND d.step_slug = p_step_slug
     AND ps.status = 'completed'
$$;

-- Cancels the given steps' queued and started tasks that nobody holds, and returns the
-- messages to be archived by the caller, last.
-- The caller holds the run: a task locked now is a worker's report or read in flight
-- (lock level 1, taken before the run), which must not be waited for; that report finds
-- the task's step or run ended and cancels the task itself (complete_tasks, fail_task).
-- Such a task's message is returned: its holder took the task first and locks messages
-- only after it (start_tasks, a report's archive), so the caller's archive may wait for it.
-- A cancelled task's message is returned only if nobody holds it, locked now: a holder is
-- a read in flight that locked the message before the task (_read_and_start; 0007, CANCEL),
-- and waiting for it would close a cycle once it asks for the task cancelled here. That
-- reader finds the task cancelled, starts nothing, and archives the message itself
-- (_drop_dead_messages).
CREATE FUNCTION pgflow._cancel_tasks_of(p_run_id uuid, p_step_slugs text[])
RETURNS bigint[]
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_flow_slug text;
  v_msgs      bigint[];
  v_free      bigint[];
  v_held      bigint[];
BEGIN
  WITH free AS (
    SELECT t.ctid AS tid
      FROM pgflow.step_tasks t
     WHERE t.run_id = p_run_id
       AND (p_step_slugs IS NULL OR t.step_slug = ANY(p_step_slugs))
       AND t.status IN ('queued', 'started')
     ORDER BY t.run_id, t.step_slug, t.task_index
       FOR NO KEY UPDATE SKIP LOCKED
  )
  UPDATE pgflow.step_tasks t
     SET status = 'cancelled'
    FROM free
   WHERE t.ctid = free.tid;

  -- Messages of the tasks held by others (still queued or started): archived, waiting.
  v_held := ARRAY(
    SELECT t.message_id
      FROM pgflow.step_tasks t
     WHERE t.run_id = p_run_id
       AND (p_step_slugs IS NULL OR t.step_slug = ANY(p_step_slugs))
       AND t.status IN ('queued', 'started')
       AND t.message_id IS NOT NULL);
  -- Messages of the cancelled tasks: only those nobody holds.
  v_msgs := ARRAY(
    SELECT t.message_id
      FROM pgflow.step_tasks t
     WHERE t.run_id = p_run_id
       AND (p_step_slugs IS NULL OR t.step_slug = ANY(p_step_slugs))
       AND t.status = 'cancelled'
       AND t.message_id IS NOT NULL
     ORDER BY t.message_id);
  SELECT r.flow_slug INTO v_flow_slug FROM pgflow.runs r WHERE r.run_id = p_run_id;
  IF cardinality(v_msgs) > 0
     AND pg_catalog.to_regclass(format('pgmq.%I', 'q_' || lower(v_flow_slug))) IS NOT NULL THEN
    EXECUTE format(
      'SELECT coalesce(array_agg(q.msg_id ORDER BY q.msg_id), ''{}'') FROM ('
      '  SELECT m.msg_id FROM pgmq.%I m WHERE m.msg_id = ANY($1)'
      '   ORDER BY m.msg_id FOR UPDATE SKIP LOCKED) q',
      'q_' || lower(v_flow_slug))
      INTO v_free
      USING v_msgs;
  END IF;
  RETURN ARRAY(SELECT m FROM unnest(coalesce(v_free, '{}') || v_held) AS m ORDER BY m);
END;
$$;

-- The step:skipped event of a skipped step state.
CREATE FUNCTION pgflow._skipped_event(p_state pgflow.step_states, p_error_message text)
RETURNS jsonb
LANGUAGE sql
IMMUTABLE
SET search_path = ''
AS $$
  SELECT jsonb_build_object(
           'event_type', 'step:skipped',
           'run_id', p_state.run_id,
           'flow_slug', p_state.flow_slug,
           'step_slug', p_state.step_slug,
           'status', 'skipped',
           'skip_reason', p_state.skip_reason,
           'skipped_at', p_state.skipped_at)
         || CASE WHEN p_error_message IS NULL THEN '{}'::jsonb
                 ELSE jsonb_build_object('error_message', p_error_message) END
$$;

-- Skips one step of a run (when_unmet or when_exhausted 'skip'): its dependents no longer
-- wait for it, and a map whose only dependency it was has nothing to map over. The caller
-- holds the run's row lock. Returns whether the step was skipped (a step already ended
-- is left as it is).
CREATE FUNCTION pgflow._skip_step(
  p_run_id uuid, p_flow_slug text, p_step_slug text, p_reason text,
  p_error_message text DEFAULT NULL
)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_state pgflow.step_states;
  v_msgs  bigint[];
BEGIN
  UPDATE pgflow.step_states ss
     SET status = 'skipped',
         skip_reason = p_reason,
         skipped_at = now(),
         remaining_tasks = NULL,
         error_message = p_error_message
   WHERE ss.run_id = p_run_id
     AND ss.step_slug = p_step_slug
     AND ss.status IN ('created', 'started')
  RETURNING * INTO v_state;
  IF NOT FOUND THEN
    RETURN false;
  END IF;

  v_msgs := pgflow._cancel_tasks_of(p_run_id, ARRAY[p_step_slug]);

  UPDATE pgflow.step_states child
     SET remaining_deps = child.remaining_deps - 1,
         initial_tasks = CASE
           WHEN cs.step_type = 'map' AND cs.deps_count = 1 THEN 0
           ELSE child.initial_tasks
         END
    FROM pgflow.deps d
    JOIN pgflow.steps cs ON cs.flow_slug = d.flow_slug AND cs.step_slug = d.step_slug
   WHERE d.flow_slug = p_flow_slug
     AND d.dep_slug = p_step_slug
     AND child.run_id = p_run_id
     AND child.step_slug = d.step_slug
     AND child.status = 'created';

  UPDATE pgflow.runs r
     SET remaining_steps = r.remaining_steps - 1
   WHERE r.run_id = p_run_id;

  PERFORM pgflow._emit(pgflow._skipped_event(v_state, p_error_message));
  PERFORM pgflow._archive_messages(p_flow_slug, v_msgs);
  RETURN true;
END;
$$;

-- Skips a step and every step downstream of it (skip-cascade): the step with skip_reason,
-- the others with 'dependency_skipped'. Steps already ended are left as they are. The
-- caller holds the run's row lock. Returns the number of steps skipped. Upstream 0.14's
-- name and signature.
CREATE FUNCTION pgflow._cascade_force_skip_steps(run_id uuid, step_slug text, skip_reason text)
RETURNS integer
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_flow_slug text;
  v_slugs     text[];
  v_events    jsonb[];
  v_msgs      bigint[];
BEGIN
  SELECT r.flow_slug INTO v_flow_slug
    FROM pgflow.runs r
   WHERE r.run_id = _cascade_force_skip_steps.run_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'Run not found: %', _cascade_force_skip_steps.run_id
      USING ERRCODE = 'no_data_found';
  END IF;

  WITH RECURSIVE downstream(step_slug) AS (
    SELECT _cascade_force_skip_steps.step_slug
    UNION
    SELECT d.step_slug
      FROM pgflow.deps d
      JOIN downstream ds ON d.dep_slug = ds.step_slug
     WHERE d.flow_slug = v_flow_slug
  ),
  skipped AS (
    UPDATE pgflow.step_states ss
       SET status = 'skipped',
           skip_reason = CASE WHEN ss.step_slug = _cascade_force_skip_steps.step_slug
                              THEN _cascade_force_skip_steps.skip_reason
                              ELSE 'dependency_skipped' END,
           skipped_at = now(),
           remaining_tasks = NULL
      FROM downstream ds
     WHERE ss.run_id = _cascade_force_skip_steps.run_id
       AND ss.step_slug = ds.step_slug
       AND ss.status IN ('created', 'started')
    RETURNING ss.*
  )
  SELECT array_agg(sk.step_slug ORDER BY s.step_index),
         array_agg(pgflow._skipped_event(sk, NULL) ORDER BY s.step_index)
    INTO v_slugs, v_events
    FROM skipped sk
    JOIN pgflow.steps s ON s.flow_slug = v_flow_slug AND s.step_slug = sk.step_slug;

  IF v_slugs IS NULL THEN
    RETURN 0;
  END IF;

  v_msgs := pgflow._cancel_tasks_of(_cascade_force_skip_steps.run_id, v_slugs);

  UPDATE pgflow.runs r
     SET remaining_steps = r.remaining_steps - cardinality(v_slugs)
   WHERE r.run_id = _cascade_force_skip_steps.run_id;

  PERFORM pgflow._emit_all(v_events);
  PERFORM pgflow._archive_messages(v_flow_slug, v_msgs);
  RETURN cardinality(v_slugs);
END;
$$;

-- Decides every ready step of a run that has a condition, until nothing changes: an unmet
-- condition fails, skips or cascade-skips its step by when_unmet (see CONDITIONS above);
-- a met one leaves the step ready to start. Returns false when the run failed (now or
-- before), true otherwise. The caller holds the run's row lock. Upstream 0.14's name and
-- signature; a fail comes before any skip of the same pass, in step_index order.
CREATE FUNCTION pgflow.cascade_resolve_conditions(run_id uuid)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_flow_slug  text;
  v_status     text;
  v_input      jsonb;
  v_slugs      text[];
  v_modes      text[];
  v_iterations integer := 0;
  v_msgs       bigint[];
  i            integer;
BEGIN
  SELECT r.flow_slug, r.status, r.input INTO v_flow_slug, v_status, v_input
    FROM pgflow.runs r
   WHERE r.run_id = cascade_resolve_conditions.run_id;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  IF v_status <> 'started' THEN
    RETURN v_status <> 'failed';
  END IF;

  LOOP
    v_iterations := v_iterations + 1;
    IF v_iterations > 50 THEN
      RAISE EXCEPTION 'cascade_resolve_conditions exceeded safety limit of % iterations', 50;
    END IF;

    SELECT array_agg(u.step_slug ORDER BY u.step_index), array_agg(u.when_unmet ORDER BY u.step_index)
      INTO v_slugs, v_modes
      FROM (
        SELECT ss.step_slug, s.step_index, s.when_unmet
          FROM pgflow.step_states ss
          JOIN pgflow.steps s ON s.flow_slug = ss.flow_slug AND s.step_slug = ss.step_slug
         WHERE ss.run_id = cascade_resolve_conditions.run_id
           AND ss.status = 'created'
           AND ss.remaining_deps = 0
           AND (s.required_input_pattern IS NOT NULL OR s.forbidden_input_pattern IS NOT NULL)
           AND NOT pgflow._condition_met(
                 CASE WHEN s.deps_count = 0 THEN v_input
                      ELSE pgflow._deps_output(ss.run_id, ss.flow_slug, ss.step_slug) END,
                 s.required_input_pattern, s.forbidden_input_pattern)
      ) u;

    EXIT WHEN v_slugs IS NULL;

    i := array_position(v_modes, 'fail');
    IF i IS NOT NULL THEN
      v_msgs := pgflow._fail_run(cascade_resolve_conditions.run_id, v_flow_slug, v_slugs[i],
                                 'Condition not met');
      PERFORM pgflow._archive_messages(v_flow_slug, v_msgs);
      RETURN false;
    END IF;

    FOR i IN 1 .. cardinality(v_slugs) LOOP
      IF v_modes[i] = 'skip' THEN
        PERFORM pgflow._skip_step(cascade_resolve_conditions.run_id, v_flow_slug, v_slugs[i],
                                  'condition_unmet');
      ELSE
        PERFORM pgflow._cascade_force_skip_steps(cascade_resolve_conditions.run_id, v_slugs[i],
                                                 'condition_unmet');
      END IF;
    END LOOP;
  END LOOP;

  RETURN true;
END;
$$;

-- -------------------------------------------------------------------------------------
-- Run progression with conditions, skips and stored outputs
-- -------------------------------------------------------------------------------------

-- 0001's cascade: an empty step completes with its output stored ([]: only a map can have
-- no task), unless it has a condition that is not met, which cascade_resolve_conditions
-- decides first. A cancelled run is left alone like a failed one.
CREATE OR REPLACE FUNCTION pgflow.cascade_complete_taskless_steps(run_id uuid)
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
  v_input      jsonb;
  v_total      integer := 0;
  v_iterations integer := 0;
  v_slugs      text[];
BEGIN
  SELECT r.flow_slug, r.status, r.input INTO v_flow_slug, v_status, v_input
    FROM pgflow.runs r
   WHERE r.run_id = cascade_complete_taskless_steps.run_id
     FOR NO KEY UPDATE;
  IF NOT FOUND OR v_status <> 'started' THEN
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
             remaining_tasks = 0,
             output = '[]'::jsonb
        FROM pgflow.steps s
       WHERE ss.run_id = cascade_complete_taskless_steps.run_id
         AND ss.status = 'created'
         AND ss.remaining_deps = 0
         AND ss.initial_tasks = 0
         AND s.flow_slug = v_flow_slug
         AND s.step_slug = ss.step_slug
         AND ((s.required_input_pattern IS NULL AND s.forbidden_input_pattern IS NULL)
              OR pgflow._condition_met(
                   CASE WHEN s.deps_count = 0 THEN v_input
                        ELSE pgflow._deps_output(ss.run_id, ss.flow_slug, ss.step_slug) END,
                   s.required_input_pattern, s.forbidden_input_pattern))
      RETURNING ss.step_slug, s.step_index
    )
    SELECT array_agg(done.step_slug ORDER BY done.step_index)
      INTO v_slugs
      FROM done;

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

-- 0001's start_ready_steps, deciding conditions first: conditions and empty steps are
-- settled, each able to ready steps for the other, until neither changes anything; then
-- the ready steps start.
CREATE OR REPLACE FUNCTION pgflow.start_ready_steps(run_id uuid)
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
  v_flow_slug  text;
  v_status     text;
  v_slugs      text[];
  v_iterations integer := 0;
BEGIN
  SELECT r.flow_slug, r.status INTO v_flow_slug, v_status
    FROM pgflow.runs r
   WHERE r.run_id = start_ready_steps.run_id
     FOR NO KEY UPDATE;
  IF NOT FOUND OR v_status <> 'started' THEN
    RETURN;
  END IF;

  LOOP
    v_iterations := v_iterations + 1;
    IF v_iterations > 50 THEN
      RAISE EXCEPTION 'start_ready_steps exceeded safety limit of % iterations', 50;
    END IF;
    IF NOT pgflow.cascade_resolve_conditions(start_ready_steps.run_id) THEN
      RETURN;
    END IF;
    EXIT WHEN pgflow.cascade_complete_taskless_steps(start_ready_steps.run_id) = 0;
  END LOOP;

  SELECT array_agg(s.step_slug) INTO v_slugs FROM pgflow.steps s WHERE s.flow_slug = v_flow_slug;
  PERFORM pgflow._start_ready_steps(
    v_flow_slug, array_fill(start_ready_steps.run_id, ARRAY[cardinality(v_slugs)]), v_slugs);
END;
$$;

-- 0001's _complete_runs, the output built from the stored outputs of the completed leaves
-- (a skipped leaf is absent).
CREATE OR REPLACE FUNCTION pgflow._complete_runs(p_run_ids uuid[])
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
  WITH done AS (
    UPDATE pgflow.runs r
       SET status = 'completed',
           completed_at = now(),
           output = (
             SELECT coalesce(jsonb_object_agg(leaf.step_slug, ls.output), '{}'::jsonb)
               FROM pgflow.steps leaf
               JOIN pgflow.step_states ls
                 ON ls.run_id = r.run_id AND ls.step_slug = leaf.step_slug
              WHERE leaf.flow_slug = r.flow_slug
                AND ls.status = 'completed'
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

-- 0005's _fail_run: the run's queued and started tasks become cancelled (those a worker
-- holds right now are cancelled by its report: see FAILED RUNS above). Returns their
-- messages for the caller to archive, as before.
CREATE OR REPLACE FUNCTION pgflow._fail_run(
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
DECLARE
  v_step_failed jsonb;
  v_run_failed  jsonb;
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

  v_step_failed := jsonb_build_object(
    'event_type', 'step:failed',
    'run_id', p_run_id,
    'flow_slug', p_flow_slug,
    'step_slug', p_step_slug,
    'status', 'failed',
    'error_message', p_error_message,
    'failed_at', now()
  );
  v_run_failed := jsonb_build_object(
    'event_type', 'run:failed',
    'run_id', p_run_id,
    'flow_slug', p_flow_slug,
    'status', 'failed',
    'error_message', p_error_message,
    'failed_at', now()
  );

  IF p_error_message LIKE '[TYPE\_VIOLATION] %' AND EXISTS (
       SELECT 1
         FROM pgflow.step_tasks t
        WHERE t.run_id = p_run_id
          AND t.step_slug = p_step_slug
          AND t.task_index = 0
          AND t.status = 'failed'
          AND t.error_message IS DISTINCT FROM p_error_message) THEN
    PERFORM pgflow._emit_all(ARRAY[v_run_failed, v_step_failed]);
  ELSE
    PERFORM pgflow._emit_all(ARRAY[v_step_failed, v_run_failed]);
  END IF;

  -- Its queued and started tasks are cancelled (upstream 0.15.1), their messages archived
  -- by the caller.
  RETURN pgflow._cancel_tasks_of(p_run_id, NULL);
END;
$$;

-- 0009's _start_flow: a root step with a condition sends the run through start_ready_steps,
-- which decides the conditions before anything starts (an unmet one with when_unmet 'fail'
-- fails the run at once, as upstream's start_flow does).
CREATE OR REPLACE FUNCTION pgflow._start_flow(
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
  v_cond_roots    boolean;
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
         array_agg(s.step_slug) FILTER (WHERE s.deps_count = 0),
         coalesce(bool_or(s.deps_count = 0 AND (s.required_input_pattern IS NOT NULL
                                                OR s.forbidden_input_pattern IS NOT NULL)), false)
    INTO v_step_count, v_has_root_map, v_roots, v_cond_roots
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

  -- Roots are inserted started, unless an empty root map or a root's condition sends the
  -- run through start_ready_steps below: every root then has tasks (a single step one, a
  -- root map the input's length) and nothing to decide.
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
            s.deps_count = 0 AND v_root_tasks IS DISTINCT FROM 0 AND NOT v_cond_roots AS starts
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
  IF v_root_tasks = 0 OR v_cond_roots THEN
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

  IF v_root_tasks = 0 OR v_cond_roots OR v_step_count = 0 THEN
    PERFORM pgflow.maybe_complete_run(v_run.run_id);
    RETURN QUERY SELECT * FROM pgflow.runs r WHERE r.run_id = v_run.run_id;
    RETURN;
  END IF;

  -- Starting root steps leaves the run's row as inserted.
  RETURN NEXT v_run;
END;
$$;

-- 0007's fail_task with its step's when_exhausted: an exhausted (or permanent) failure
-- fails the run, or skips the step (skip_reason 'handler_failed', the error kept on the
-- step) and the run goes on. A report for a task whose step was skipped meanwhile cancels
-- the task and changes nothing else. Every fail_task form comes here.
CREATE OR REPLACE FUNCTION pgflow_private.fail_task(
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
  v_step_status  text;
  v_when         text;
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
           coalesce(s.opt_jitter, f.opt_jitter),
           s.when_exhausted, ss.status
      INTO v_max_attempts, v_base_delay, v_max_delay, v_jitter, v_when, v_step_status
      FROM pgflow.steps s
      JOIN pgflow.flows f ON f.flow_slug = s.flow_slug
      JOIN pgflow.step_states ss
        ON ss.run_id = fail_task.run_id AND ss.step_slug = fail_task.step_slug
     WHERE s.flow_slug = v_flow_slug
       AND s.step_slug = fail_task.step_slug;

    -- The step was skipped meanwhile (a sibling task's exhaustion, a cascade): this
    -- attempt ends without effect, its task cancelled (see FAILED RUNS above).
    IF v_step_status <> 'started' THEN
      UPDATE pgflow.step_tasks t
         SET status = 'cancelled',
             error_message = fail_task.error_message
       WHERE t.run_id = fail_task.run_id
         AND t.step_slug = fail_task.step_slug
         AND t.task_index = fail_task.task_index
      RETURNING * INTO v_task;
      PERFORM pgflow._archive_messages(v_flow_slug, ARRAY[v_task.message_id]);
      RETURN NEXT v_task;
      RETURN;
    END IF;

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

    -- By the step's when_exhausted (upstream 0.14): fail the run, or skip the step (and,
    -- for skip-cascade, everything downstream of it) and let the run go on. Whether the
    -- step is still started is read again under the locks.
    SELECT ss.status INTO v_step_status
      FROM pgflow.step_states ss
     WHERE ss.run_id = fail_task.run_id AND ss.step_slug = fail_task.step_slug;
    IF v_run_status = 'started' AND v_step_status = 'started' THEN
      IF coalesce(v_when, 'fail') = 'fail' THEN
        v_msgs := pgflow._fail_run(fail_task.run_id, v_flow_slug, fail_task.step_slug,
                                   fail_task.error_message);
      ELSE
        PERFORM pgflow._skip_step(fail_task.run_id, v_flow_slug, fail_task.step_slug,
                                  'handler_failed', fail_task.error_message);
        IF v_when = 'skip-cascade' THEN
          PERFORM pgflow._cascade_force_skip_steps(fail_task.run_id, fail_task.step_slug,
                                                   'handler_failed');
        END IF;
        PERFORM pgflow.start_ready_steps(fail_task.run_id);
        PERFORM pgflow.maybe_complete_run(fail_task.run_id);
      END IF;
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

-- 0001's complete_tasks (pgflow_private's since 0004, under every completion form): a
-- step that completes stores its output; a dependent with a condition is started through
-- start_ready_steps, which decides it; a started task of a failed run or of a step no
-- longer started is cancelled instead of completed.
CREATE OR REPLACE FUNCTION pgflow_private.complete_tasks(
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
  g_live        boolean[];
  v_dead        integer[];
  v_failed      uuid[];
  v_may_violate boolean;
  -- dependents released by the steps that finished
  d_run         uuid[];
  d_step        text[];
  d_count       integer[];
  d_tasks       integer[];
  d_is_map      boolean[];
  d_starts      boolean[];
  d_cond        boolean[];
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
         array_agg(q.live),
         coalesce(bool_or(q.completes AND q.step_type = 'single'
                          AND jsonb_typeof(v_outputs[q.first_ord]) IS DISTINCT FROM 'array'),
                  false)
    INTO g_run, g_step, g_flow, g_type, g_count, g_first, g_completes, g_initial, g_started_at,
         g_live, v_may_violate
    FROM (
      SELECT g.run_id, g.step_slug, ss.flow_slug, s.step_type, g.n, g.first_ord,
             ss.status = 'started' AND ss.remaining_tasks <= g.n AS completes,
             ss.initial_tasks, ss.started_at, ss.status = 'started' AS live
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

  -- Started tasks of a failed run, or of a step no longer started (skipped meanwhile), end
  -- here without effect: cancelled, their messages archived (see FAILED RUNS above).
  v_dead := ARRAY(
    SELECT x.ordinality
      FROM unnest(v_rows) WITH ORDINALITY AS x
      JOIN unnest(g_run, g_step, g_live) AS g(run_id, step_slug, live)
        ON g.run_id = x.run_id AND g.step_slug = x.step_slug
     WHERE x.status = 'started'
       AND NOT x.ordinality = ANY(v_skip)
       AND (x.run_id = ANY(v_failed) OR NOT g.live));
  IF cardinality(v_dead) > 0 THEN
    WITH dead AS (
      UPDATE pgflow.step_tasks t
         SET status = 'cancelled'
        FROM unnest(v_dead) AS d(i)
       WHERE t.ctid = v_tids[d.i]
      RETURNING t.flow_slug, t.message_id
    )
    SELECT v_archive_q || coalesce(array_agg(dead.flow_slug), '{}'),
           v_archive || coalesce(array_agg(dead.message_id), '{}')
      INTO v_archive_q, v_archive
      FROM dead;
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
               AND NOT (x.run_id = ANY(v_failed))
               AND NOT x.ordinality = ANY(v_dead)) u
     WHERE t.ctid = u.tid
    RETURNING t.flow_slug, t.message_id
  )
  SELECT v_archive_q || coalesce(array_agg(done.flow_slug), '{}'),
         v_archive || coalesce(array_agg(done.message_id), '{}')
    INTO v_archive_q, v_archive
    FROM done;

  -- A step that completes stores its output: its task's, or its tasks' in task_index order.
  UPDATE pgflow.step_states ss
     SET remaining_tasks = CASE WHEN c.completes THEN 0 ELSE ss.remaining_tasks - c.n END,
         status = CASE WHEN c.completes THEN 'completed' ELSE ss.status END,
         completed_at = CASE WHEN c.completes THEN now() ELSE ss.completed_at END,
         output = CASE
           WHEN NOT c.completes THEN ss.output
           WHEN c.step_type = 'single' THEN v_outputs[c.first_ord]
           ELSE (SELECT coalesce(jsonb_agg(t.output ORDER BY t.task_index), '[]'::jsonb)
                   FROM pgflow.step_tasks t
                  WHERE t.run_id = c.run_id
                    AND t.step_slug = c.step_slug
                    AND t.status = 'completed')
         END
    FROM unnest(g_run, g_step, g_count, g_completes, g_type, g_first, g_live)
         AS c(run_id, step_slug, n, completes, step_type, first_ord, live)
   WHERE ss.run_id = c.run_id
     AND ss.step_slug = c.step_slug
     AND c.live
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
                 WHEN v_realtime THEN (
                   SELECT ss.output FROM pgflow.step_states ss
                    WHERE ss.run_id = c.run_id AND ss.step_slug = c.step_slug)
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
    -- A dependent with a condition is never started here: its run goes through
    -- start_ready_steps, which decides the condition first (like an empty map's).
    SELECT array_agg(rel.run_id), array_agg(rel.step_slug), array_agg(rel.n),
           array_agg(rel.map_tasks), array_agg(rel.is_map), array_agg(rel.starts),
           array_agg(rel.has_cond)
      INTO d_run, d_step, d_count, d_tasks, d_is_map, d_starts, d_cond
      FROM (
        SELECT x.run_id, x.step_slug, x.n, x.map_tasks, x.is_map, x.has_cond,
               x.ready AND x.tasks > 0 AND NOT x.has_cond
                 AND NOT bool_or(x.ready AND (coalesce(x.tasks, 0) = 0 OR x.has_cond))
                           OVER (PARTITION BY x.run_id) AS starts
          FROM (
            SELECT g.run_id, g.step_slug, g.n, g.map_tasks, g.is_map, g.has_cond,
                   ss.status = 'created' AND ss.remaining_deps = g.n AS ready,
                   CASE
                     WHEN g.is_map AND ss.initial_tasks IS NULL THEN g.map_tasks
                     ELSE ss.initial_tasks
                   END AS tasks
              FROM (
                SELECT f.run_id, d.step_slug, count(*)::integer AS n,
                       bool_and(cs.step_type = 'map') AS is_map,
                       bool_or(cs.required_input_pattern IS NOT NULL
                               OR cs.forbidden_input_pattern IS NOT NULL) AS has_cond,
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
        FROM unnest(d_run, d_step, d_count, d_tasks, d_is_map, d_starts, d_cond)
             AS rel(run_id, step_slug, n, map_tasks, is_map, starts, has_cond)
       WHERE child.run_id = rel.run_id
         AND child.step_slug = rel.step_slug
      RETURNING child.run_id, child.flow_slug, child.step_slug, child.status,
                child.remaining_deps, child.initial_tasks, rel.starts, rel.has_cond
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
                               AND (coalesce(rel.initial_tasks, 0) = 0 OR rel.has_cond))
                     AS cascade
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

-- What a task's attempt that its worker lost records as its error (the read path of
-- _start_tasks and requeue_stalled_tasks).
CREATE FUNCTION pgflow._lost_attempt_message(p_timeout integer, p_attempt integer)
RETURNS text
LANGUAGE sql
IMMUTABLE
SET search_path = ''
AS $$
  SELECT format('Task did not finish within its timeout of %s seconds on attempt %s (its worker was lost)',
                p_timeout, p_attempt)
$$;

-- 0001's _start_tasks, reading dependencies' stored outputs (STORED OUTPUTS above).
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
      pgflow._lost_attempt_message(v_stale.timeout, v_stale.attempts_count));
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

-- -------------------------------------------------------------------------------------
-- Stalled tasks (upstream 0.13.2's requeue_stalled_tasks, reconciled with 0001's rule)
-- -------------------------------------------------------------------------------------

-- One row per periodic sweep: when it last ran, so that many workers calling it on their
-- timers run it once per period for the whole cluster.
CREATE TABLE pgflow_ext.sweeps (
  sweep_name text        NOT NULL,
  last_at    timestamptz NOT NULL,
  CONSTRAINT sweeps_pkey PRIMARY KEY (sweep_name)
);
REVOKE ALL ON TABLE pgflow_ext.sweeps FROM public;
INSERT INTO pgflow_ext.sweeps (sweep_name, last_at) VALUES ('requeue_stalled_tasks', '-infinity');

-- Requeues tasks started longer ago than their step's timeout plus 30 seconds: their worker
-- was lost and their message did not come back to a reader (0001's path, which takes such a
-- task at timeout + 2 s) -- it was archived, or nobody reads the queue. Upstream's rule,
-- with this engine's attempt counting: the lost attempt counts, so
--   * a task with attempts left goes back to 'queued' (requeued_count + 1, its message
--     visible now, sent again if it is gone); the next start is its next attempt;
--   * a task with none left fails as a lost attempt does on the read path;
--   * a task requeued 3 times already is marked permanently_stalled_at, its message
--     archived, and left 'started' for an operator (pgflow check, cancel_run, retry_run);
--   * a task whose step is no longer started (skipped while a reader held the task, which
--     the skip cannot wait for) is cancelled, its message archived: requeued, it would run
--     its handler again for a step that is over.
-- Only tasks of started runs, found through them (idx_runs_status and the tasks' primary
-- key), so a sweep costs what the running runs hold, not the history. Tasks held by a
-- report in flight are skipped. Returns the number of tasks requeued.
CREATE FUNCTION pgflow.requeue_stalled_tasks()
RETURNS integer
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_task      record;
  v_requeued  integer := 0;
  v_found     bigint[];
BEGIN
  FOR v_task IN
    SELECT t.run_id, t.step_slug, t.task_index, t.flow_slug, t.message_id, t.requeued_count,
           t.attempts_count, ss.status AS step_status,
           coalesce(s.opt_max_attempts, f.opt_max_attempts) AS max_attempts,
           coalesce(s.opt_timeout, f.opt_timeout) AS timeout
      FROM pgflow.runs r
      JOIN pgflow.step_tasks t ON t.run_id = r.run_id
      JOIN pgflow.step_states ss ON ss.run_id = t.run_id AND ss.step_slug = t.step_slug
      JOIN pgflow.steps s ON s.flow_slug = t.flow_slug AND s.step_slug = t.step_slug
      JOIN pgflow.flows f ON f.flow_slug = t.flow_slug
     WHERE r.status = 'started'
       AND t.status = 'started'
       AND (t.permanently_stalled_at IS NULL OR t.permanently_stalled_at < t.started_at)
       AND t.started_at < now() - make_interval(secs => coalesce(s.opt_timeout, f.opt_timeout))
                              - interval '30 seconds'
     ORDER BY t.run_id, t.step_slug, t.task_index
       FOR NO KEY UPDATE OF t SKIP LOCKED
  LOOP
    IF v_task.step_status <> 'started' THEN
      UPDATE pgflow.step_tasks t
         SET status = 'cancelled'
       WHERE t.run_id = v_task.run_id
         AND t.step_slug = v_task.step_slug
         AND t.task_index = v_task.task_index;
      PERFORM pgflow._archive_messages(v_task.flow_slug, ARRAY[v_task.message_id]);
    ELSIF v_task.attempts_count >= v_task.max_attempts THEN
      PERFORM pgflow.fail_task(v_task.run_id, v_task.step_slug, v_task.task_index,
        pgflow._lost_attempt_message(v_task.timeout, v_task.attempts_count));
    ELSIF v_task.requeued_count >= 3 THEN
      UPDATE pgflow.step_tasks t
         SET permanently_stalled_at = now()
       WHERE t.run_id = v_task.run_id
         AND t.step_slug = v_task.step_slug
         AND t.task_index = v_task.task_index;
      PERFORM pgflow._archive_messages(v_task.flow_slug, ARRAY[v_task.message_id]);
      RAISE LOG 'pgflow: task %/%/% is permanently stalled after % requeues',
        v_task.run_id, v_task.step_slug, v_task.task_index, v_task.requeued_count;
    ELSE
      UPDATE pgflow.step_tasks t
         SET status = 'queued',
             started_at = NULL,
             requeued_count = t.requeued_count + 1,
             last_requeued_at = now(),
             error_message = pgflow._lost_attempt_message(v_task.timeout, v_task.attempts_count)
       WHERE t.run_id = v_task.run_id
         AND t.step_slug = v_task.step_slug
         AND t.task_index = v_task.task_index;
      -- Its message, visible now; a message that is gone is sent again.
      EXECUTE format('UPDATE pgmq.%I q SET vt = clock_timestamp() WHERE q.msg_id = $1'
                     ' RETURNING ARRAY[q.msg_id]', 'q_' || lower(v_task.flow_slug))
        INTO v_found
        USING v_task.message_id;
      IF v_found IS NULL THEN
        UPDATE pgflow.step_tasks t
           SET message_id = (pgflow._send_messages(
                 v_task.flow_slug, ARRAY[clock_timestamp()],
                 ARRAY[jsonb_build_object('flow_slug', v_task.flow_slug,
                                          'run_id', v_task.run_id,
                                          'step_slug', v_task.step_slug,
                                          'task_index', v_task.task_index)]))[1]
         WHERE t.run_id = v_task.run_id
           AND t.step_slug = v_task.step_slug
           AND t.task_index = v_task.task_index;
      END IF;
      v_requeued := v_requeued + 1;
    END IF;
  END LOOP;
  RETURN v_requeued;
END;
$$;

-- requeue_stalled_tasks at most once per p_every across every caller: workers call this
-- on their timers, and only the first caller of a period sweeps (the others wait for its
-- row lock, then find the period taken). Returns NULL when the period was taken.
CREATE FUNCTION pgflow.requeue_stalled_tasks_due(p_every interval)
RETURNS integer
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
  IF p_every IS NULL OR p_every < interval '1 second' THEN
    RAISE EXCEPTION 'p_every must be at least 1 second (got %)', p_every
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- An upsert, so that a deleted row (a cleanup script, a restore without it) is taken as
  -- "never swept" rather than silently stopping every sweep.
  INSERT INTO pgflow_ext.sweeps AS w (sweep_name, last_at)
  VALUES ('requeue_stalled_tasks', now())
  ON CONFLICT (sweep_name) DO UPDATE
     SET last_at = excluded.last_at
   WHERE w.last_at <= now() - p_every;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  RETURN pgflow.requeue_stalled_tasks();
END;
$$;

-- -------------------------------------------------------------------------------------
-- Run control with skips (0007's retry, restated)
-- -------------------------------------------------------------------------------------

-- 0007's _retry_runs_once, knowing skipped steps and conditions (docs/sql-api.md, "Failed
-- runs"):
--   * a skipped step stays skipped: its tasks (failed by handler_failed, or cancelled) are
--     not run again, and it does not count in remaining_steps (0007 counted every step not
--     completed, so a retried run with a skipped step could never complete);
--   * a step failed by its condition ('Condition not met', when_unmet 'fail') has no task
--     (0007 refused such a run as "unfinished but has no unfinished task"): it goes back to
--     'created' and the retried run decides its ready steps again through start_ready_steps.
--     A condition reads the run input or stored outputs, which a retry does not change, so
--     such a run fails again at once, its retry recorded; a condition can only be met on a
--     retry if its step's definition changed;
--   * steps left 'created' with no dependency to wait for (a run that failed while deciding
--     the conditions of several ready steps) are started by that same call.
CREATE OR REPLACE FUNCTION pgflow._retry_runs_once(p_flow_slug text, p_run_ids uuid[])
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
  v_run      uuid;
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

  -- A step to start again always has a task to run, but a step failed by its condition,
  -- which never had one.
  SELECT ss.run_id, ss.step_slug INTO v_stuck
    FROM pgflow.step_states ss
   WHERE ss.run_id = ANY(v_runs)
     AND ss.status IN ('started', 'failed', 'cancelled')
     AND NOT EXISTS (SELECT 1 FROM pgflow.step_tasks t
                      WHERE t.run_id = ss.run_id AND t.step_slug = ss.step_slug
                        AND t.status <> 'completed')
     AND NOT (ss.status = 'failed'
              AND NOT EXISTS (SELECT 1 FROM pgflow.step_tasks t
                               WHERE t.run_id = ss.run_id AND t.step_slug = ss.step_slug))
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

  -- Steps failed by their condition wait to be decided again.
  UPDATE pgflow.step_states ss
     SET status = 'created',
         failed_at = NULL,
         error_message = NULL
   WHERE ss.run_id = ANY(v_runs)
     AND ss.status = 'failed'
     AND NOT EXISTS (SELECT 1 FROM pgflow.step_tasks t
                      WHERE t.run_id = ss.run_id AND t.step_slug = ss.step_slug);

  -- The tasks to run again, in (run, step, task) order, with their new messages: not
  -- those of skipped steps.
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
        JOIN pgflow.step_states ss ON ss.run_id = t.run_id AND ss.step_slug = t.step_slug
       WHERE t.run_id = ANY(v_runs)
         AND t.status <> 'completed'
         AND ss.status <> 'skipped'
       ORDER BY t.run_id, t.step_slug, t.task_index
    ) x;

  v_msg_ids := pgflow._send_messages(p_flow_slug, v_vts, v_messages);

  UPDATE pgflow.step_tasks t
     SET status = 'queued',
         attempts_count = 0,
         error_message = NULL,
         output = NULL,
         -- queued_at stays (0007: a worker's started_at must not precede it).
         started_at = NULL,
         completed_at = NULL,
         failed_at = NULL,
         -- A retried task starts its stall count afresh, as its attempts.
         requeued_count = 0,
         last_requeued_at = NULL,
         permanently_stalled_at = NULL,
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
                               WHERE ss.run_id = r.run_id
                                 AND ss.status NOT IN ('completed', 'skipped'))
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

  -- Ready steps that never started (a step failed by its condition, those left behind by
  -- a run that failed deciding conditions) are decided and started now; a run left with
  -- nothing to do completes.
  FOR v_run IN
    SELECT DISTINCT ss.run_id
      FROM pgflow.step_states ss
     WHERE ss.run_id = ANY(v_runs)
       AND ss.status = 'created'
       AND ss.remaining_deps = 0
     ORDER BY ss.run_id
  LOOP
    PERFORM pgflow.start_ready_steps(v_run);
    PERFORM pgflow.maybe_complete_run(v_run);
  END LOOP;

  PERFORM pg_notify('pgflow_tasks', p_flow_slug);

  RETURN v_runs;
END;
$$;

-- -------------------------------------------------------------------------------------
-- Privileges: the owner's until granted (docs/security.md)
-- -------------------------------------------------------------------------------------

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgflow FROM public;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgflow_private FROM public;
