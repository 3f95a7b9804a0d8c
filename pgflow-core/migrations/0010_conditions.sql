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
