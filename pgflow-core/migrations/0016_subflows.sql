-- =====================================================================================
-- pgflow engine, migration 0016: subflows (issue 22). A step that runs another flow as a
-- child run and completes with the child's output.
--
-- No pgflow version has these (upstream only reserves a column); everything is additive
-- (docs/sql-api.md, "Subflows"). No 0.8.1 function is replaced but requeue_stalled_tasks
-- (0010), which gains one condition.
--
-- DEFINITION
-- ----------
-- pgflow.set_subflow(flow, step, child_flow, output_step) marks a step, after its
-- add_step, as a subflow step: pgflow_ext.subflow_steps. The child flow must exist (define
-- children first), the step has at most one dependency, output_step is NULL (the child
-- run's whole output) or a leaf step of the child (that leaf's output). A definition that
-- would close a cycle (A runs B runs A) or make a chain of nested runs deeper than
-- pgflow_ext.max_subflow_depth() is refused. The child flow cannot be deleted while a
-- subflow step names it (a deferred foreign key: replacing the child in one transaction,
-- as Client::compile_replacing does, passes). set_subflow locks subflow_steps, so two
-- definitions made at once are checked one after the other (they cannot close a cycle
-- together). A subflow step cannot have limits (0014's step_limits): both orders refused.
-- Deleting the runs a parent task still waits for (its child flow replaced) fails that
-- task for good; a subflow task that leaves 'started' otherwise than through its child
-- (a stale or hostile complete_task / fail_task) cancels its running child.
--
-- INPUT
-- -----
-- The child run's input is what a handler of the step would take as its one value: for a
-- single step, its dependency's output (the parent's flow input for a root step); for a
-- map step, the element of its task. So a child flow's input type is the type of the
-- dependency's output (Rust checks it at compile time).
--
-- RUNNING
-- -------
-- Tasks of a subflow step are created as every task is (_start_ready_steps, with a
-- message); a statement trigger on the insert into step_tasks takes those of subflow
-- steps at once, in the same transaction: each becomes 'started' (one attempt counted)
-- without a worker and without a message (its message is archived, message_id NULL), and
-- a child run is started with its input (pgflow._start_flow) and linked to it in
-- pgflow_ext.subflow_runs. No worker ever reads it: workers start tasks from messages, and
-- requeue_stalled_tasks passes over tasks without one, so no timeout applies to it. A row
-- trigger does the same for a subflow task that goes back to 'queued' (fail_task's retry,
-- retry_run).
--
-- When a child run ends, a row trigger on pgflow.runs reports to its parent task, if it
-- is still that task's current attempt:
--   completed  -> pgflow_private.complete_tasks with the child's output (or its output
--                 step's entry of it), the normal completion path: dependents start, the
--                 parent run completes.
--   failed     -> pgflow_private.fail_task: with attempts left the task is queued again and
--                 a NEW child run starts at once (no backoff delay; the failed child stays
--                 as it ended); without, the step's when_exhausted applies.
--   cancelled  -> fail_task, permanent: an operator cancelling a child fails the parent
--                 step (no retry), with a message naming the child.
-- A parent task that is cancelled (the parent run cancelled or failed, its step skipped)
-- cancels its running child, which cancels its own children, and so on.
--
-- Lock order: a child's completion locks the child, then the parent task; a parent's
-- cancel locks the parent, then the child. The two can meet; the deadlock detector then
-- aborts one, and both sides are retried (_cancel_runs retries itself; a worker retries
-- its report).
-- =====================================================================================

CREATE FUNCTION pgflow_ext.max_subflow_depth()
RETURNS integer
LANGUAGE sql
IMMUTABLE
AS $$ SELECT 16 $$;

CREATE TABLE pgflow_ext.subflow_steps (
  flow_slug       text NOT NULL,
  step_slug       text NOT NULL,
  child_flow_slug text NOT NULL,
  output_step     text,
  CONSTRAINT subflow_steps_pkey PRIMARY KEY (flow_slug, step_slug),
  CONSTRAINT subflow_steps_step_fkey FOREIGN KEY (flow_slug, step_slug)
    REFERENCES pgflow.steps (flow_slug, step_slug) ON DELETE CASCADE,
  -- Deferred: a child replaced (deleted and created again) in one transaction passes; a
  -- child deleted for good is refused at commit.
  CONSTRAINT subflow_steps_child_flow_fkey FOREIGN KEY (child_flow_slug)
    REFERENCES pgflow.flows (flow_slug) DEFERRABLE INITIALLY DEFERRED
);

CREATE INDEX subflow_steps_child_flow_slug ON pgflow_ext.subflow_steps (child_flow_slug);

CREATE TABLE pgflow_ext.subflow_runs (
  child_run_id      uuid        NOT NULL,
  parent_run_id     uuid        NOT NULL,
  parent_step_slug  text        NOT NULL,
  parent_task_index integer     NOT NULL,
  -- The parent task's attempt the child was started for. A child reports only while it is
  -- its task's latest child and the task is still on that attempt.
  parent_attempt    integer     NOT NULL,
  depth             integer     NOT NULL,
  created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
  CONSTRAINT subflow_runs_pkey PRIMARY KEY (child_run_id),
  -- Deferred: the link is written before the child run, so that a child that completes
  -- while it starts (an empty flow) finds its parent.
  CONSTRAINT subflow_runs_child_fkey FOREIGN KEY (child_run_id)
    REFERENCES pgflow.runs (run_id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
  CONSTRAINT subflow_runs_parent_fkey FOREIGN KEY (parent_run_id)
    REFERENCES pgflow.runs (run_id) ON DELETE CASCADE,
  CONSTRAINT depth_is_positive CHECK (depth >= 1)
);

CREATE INDEX subflow_runs_parent
  ON pgflow_ext.subflow_runs (parent_run_id, parent_step_slug, parent_task_index);

REVOKE ALL ON TABLE pgflow_ext.subflow_steps, pgflow_ext.subflow_runs FROM public;

-- -------------------------------------------------------------------------------------
-- Definition
-- -------------------------------------------------------------------------------------

CREATE FUNCTION pgflow.set_subflow(
  flow_slug text, step_slug text, child_flow_slug text, output_step text DEFAULT NULL
)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_deps    integer;
  v_current pgflow_ext.subflow_steps;
  v_cycle   text;
  v_up      integer;
  v_down    integer;
BEGIN
  -- Two definitions checked at once could each miss the other's row and close a cycle
  -- together (a -> b and b -> a): one definition at a time. Conflicts with itself and with
  -- writes of subflow_steps, not with the reads that start runs.
  LOCK TABLE pgflow_ext.subflow_steps IN SHARE ROW EXCLUSIVE MODE;
  SELECT s.deps_count INTO v_deps
    FROM pgflow.steps s
   WHERE s.flow_slug = set_subflow.flow_slug AND s.step_slug = set_subflow.step_slug;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'step % of flow % not found', set_subflow.step_slug, set_subflow.flow_slug
      USING ERRCODE = 'no_data_found';
  END IF;
  IF v_deps > 1 THEN
    RAISE EXCEPTION 'subflow step %.% has % dependencies: a subflow step takes its child''s input from at most one',
      set_subflow.flow_slug, set_subflow.step_slug, v_deps
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pgflow.flows f WHERE f.flow_slug = set_subflow.child_flow_slug) THEN
    RAISE EXCEPTION 'child flow % of subflow step %.% does not exist: define it before the flows that run it',
      set_subflow.child_flow_slug, set_subflow.flow_slug, set_subflow.step_slug
      USING ERRCODE = 'no_data_found';
  END IF;
  IF set_subflow.output_step IS NOT NULL AND NOT EXISTS (
       SELECT 1 FROM pgflow.steps s
        WHERE s.flow_slug = set_subflow.child_flow_slug
          AND s.step_slug = set_subflow.output_step
          AND NOT EXISTS (SELECT 1 FROM pgflow.deps d
                           WHERE d.flow_slug = s.flow_slug AND d.dep_slug = s.step_slug)) THEN
    RAISE EXCEPTION 'output step % of subflow step %.% is not a leaf step of flow %',
      set_subflow.output_step, set_subflow.flow_slug, set_subflow.step_slug,
      set_subflow.child_flow_slug
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- Child runs start from a trigger, never through the limited start path: a limit would
  -- be ignored.
  IF EXISTS (SELECT 1 FROM pgflow_ext.step_limits l
              WHERE l.flow_slug = set_subflow.flow_slug AND l.step_slug = set_subflow.step_slug) THEN
    RAISE EXCEPTION 'step %.% has concurrency or rate limits: a subflow step cannot be limited (limit the child flow''s steps instead)',
      set_subflow.flow_slug, set_subflow.step_slug
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  SELECT * INTO v_current FROM pgflow_ext.subflow_steps s
   WHERE s.flow_slug = set_subflow.flow_slug AND s.step_slug = set_subflow.step_slug;
  IF FOUND AND v_current.child_flow_slug = set_subflow.child_flow_slug
     AND v_current.output_step IS NOT DISTINCT FROM set_subflow.output_step THEN
    RETURN;
  END IF;
  IF EXISTS (SELECT 1 FROM pgflow.runs r WHERE r.flow_slug = set_subflow.flow_slug) THEN
    RAISE EXCEPTION 'flow % has runs: a step cannot become a subflow step under them (give the flow a new slug)',
      set_subflow.flow_slug
      USING ERRCODE = 'object_in_use';
  END IF;

  -- A cycle: the parent flow reachable from the child through subflow steps.
  WITH RECURSIVE down(flow_slug, path) AS (
    SELECT set_subflow.child_flow_slug, ARRAY[set_subflow.flow_slug, set_subflow.child_flow_slug]
    UNION
    SELECT sf.child_flow_slug, d.path || sf.child_flow_slug
      FROM down d
      JOIN pgflow_ext.subflow_steps sf ON sf.flow_slug = d.flow_slug
     WHERE cardinality(d.path) <= pgflow_ext.max_subflow_depth() + 2
       AND NOT (d.flow_slug = ANY(d.path[1:cardinality(d.path) - 1]))
  )
  SELECT array_to_string(d.path, ' -> ') INTO v_cycle
    FROM down d
   WHERE d.flow_slug = set_subflow.flow_slug
   LIMIT 1;
  IF v_cycle IS NOT NULL THEN
    RAISE EXCEPTION 'subflow step %.% would close a cycle of flows running each other: %',
      set_subflow.flow_slug, set_subflow.step_slug, v_cycle
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- The deepest chain through this step: flows above the parent, the parent, the child
  -- and flows below it, each a level of nested runs.
  WITH RECURSIVE up(flow_slug, n) AS (
    SELECT set_subflow.flow_slug, 0
    UNION ALL
    SELECT sf.flow_slug, u.n + 1
      FROM up u JOIN pgflow_ext.subflow_steps sf ON sf.child_flow_slug = u.flow_slug
     WHERE u.n <= pgflow_ext.max_subflow_depth()
  )
  SELECT max(u.n) INTO v_up FROM up u;
  WITH RECURSIVE down(flow_slug, n) AS (
    SELECT set_subflow.child_flow_slug, 1
    UNION ALL
    SELECT sf.child_flow_slug, d.n + 1
      FROM down d JOIN pgflow_ext.subflow_steps sf ON sf.flow_slug = d.flow_slug
     WHERE d.n <= pgflow_ext.max_subflow_depth()
  )
  SELECT max(d.n) INTO v_down FROM down d;
  IF v_up + v_down > pgflow_ext.max_subflow_depth() THEN
    RAISE EXCEPTION 'subflow step %.% would nest runs % deep (flow % runs under % levels, flow % runs % below it); at most % levels of child runs are allowed',
      set_subflow.flow_slug, set_subflow.step_slug, v_up + v_down, set_subflow.flow_slug,
      v_up, set_subflow.child_flow_slug, v_down - 1, pgflow_ext.max_subflow_depth()
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  INSERT INTO pgflow_ext.subflow_steps (flow_slug, step_slug, child_flow_slug, output_step)
  VALUES (set_subflow.flow_slug, set_subflow.step_slug, set_subflow.child_flow_slug,
          set_subflow.output_step)
  ON CONFLICT ON CONSTRAINT subflow_steps_pkey DO UPDATE
    SET child_flow_slug = EXCLUDED.child_flow_slug,
        output_step = EXCLUDED.output_step;
END;
$$;

-- -------------------------------------------------------------------------------------
-- Starting child runs
-- -------------------------------------------------------------------------------------

-- Starts a child run for each of the given tasks that is a queued task of a subflow step
-- (see RUNNING above); others are left as they are.
CREATE FUNCTION pgflow_private._launch_subflows(
  p_run_ids uuid[], p_step_slugs text[], p_task_indexes integer[]
)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_task   record;
  v_source jsonb;
  v_input  jsonb;
  v_depth  integer;
  v_child  uuid;
  v_events jsonb[] := '{}';
BEGIN
  FOR v_task IN
    SELECT t.run_id, t.step_slug, t.task_index, t.flow_slug, t.message_id, t.attempts_count,
           sf.child_flow_slug, s.step_type, s.deps_count
      FROM unnest(p_run_ids, p_step_slugs, p_task_indexes) AS u(run_id, step_slug, task_index)
      JOIN pgflow.step_tasks t
        ON t.run_id = u.run_id AND t.step_slug = u.step_slug AND t.task_index = u.task_index
      JOIN pgflow_ext.subflow_steps sf
        ON sf.flow_slug = t.flow_slug AND sf.step_slug = t.step_slug
      JOIN pgflow.steps s ON s.flow_slug = t.flow_slug AND s.step_slug = t.step_slug
     WHERE t.status = 'queued'
     ORDER BY t.run_id, t.step_slug, t.task_index
  LOOP
    -- What a handler of the step would take: its dependency's output (or the flow input),
    -- or for a map task the element at its index.
    IF v_task.deps_count = 0 THEN
      SELECT r.input INTO v_source FROM pgflow.runs r WHERE r.run_id = v_task.run_id;
    ELSE
      SELECT ps.output INTO v_source
        FROM pgflow.deps d
        JOIN pgflow.step_states ps ON ps.run_id = v_task.run_id AND ps.step_slug = d.dep_slug
       WHERE d.flow_slug = v_task.flow_slug AND d.step_slug = v_task.step_slug;
    END IF;
    v_input := CASE WHEN v_task.step_type = 'map' THEN v_source -> v_task.task_index
                    ELSE v_source END;

    v_depth := coalesce((SELECT l.depth FROM pgflow_ext.subflow_runs l
                          WHERE l.child_run_id = v_task.run_id), 0) + 1;

    UPDATE pgflow.step_tasks t
       SET status = 'started',
           attempts_count = t.attempts_count + 1,
           started_at = now(),
           message_id = NULL,
           last_worker_id = NULL
     WHERE t.run_id = v_task.run_id
       AND t.step_slug = v_task.step_slug
       AND t.task_index = v_task.task_index;
    IF v_task.message_id IS NOT NULL THEN
      PERFORM pgflow._archive_messages(v_task.flow_slug, ARRAY[v_task.message_id]);
    END IF;

    -- Definitions refuse chains deeper than this; a chain built by definitions made before
    -- (or around) that check still stops here, failing the task for good.
    IF v_depth > pgflow_ext.max_subflow_depth() THEN
      PERFORM pgflow_private.fail_task(v_task.run_id, v_task.step_slug, v_task.task_index,
        format('subflow depth limit: step %s of run %s would start a child run at depth %s; at most %s levels are allowed',
               v_task.step_slug, v_task.run_id, v_depth, pgflow_ext.max_subflow_depth()),
        v_task.attempts_count + 1, NULL, true, NULL);
      CONTINUE;
    END IF;

    v_child := gen_random_uuid();
    INSERT INTO pgflow_ext.subflow_runs
      (child_run_id, parent_run_id, parent_step_slug, parent_task_index, parent_attempt,
       depth)
    VALUES (v_child, v_task.run_id, v_task.step_slug, v_task.task_index,
            v_task.attempts_count + 1, v_depth);
    v_events := v_events || jsonb_build_object(
      'event_type', 'step:subflow_started',
      'run_id', v_task.run_id,
      'flow_slug', v_task.flow_slug,
      'step_slug', v_task.step_slug,
      'task_index', v_task.task_index,
      'child_run_id', v_child,
      'child_flow_slug', v_task.child_flow_slug,
      'depth', v_depth);
    PERFORM pgflow._start_flow(v_task.child_flow_slug, v_input, v_child, NULL);
  END LOOP;
  PERFORM pgflow._emit_all(v_events);
END;
$$;

-- After an insert into step_tasks: its rows of subflow steps (all of them queued).
CREATE FUNCTION pgflow_private._subflow_tasks_inserted()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_runs  uuid[];
  v_steps text[];
  v_idx   integer[];
BEGIN
  -- The common case, no subflow step anywhere, costs one probe.
  IF NOT EXISTS (SELECT 1 FROM pgflow_ext.subflow_steps) THEN
    RETURN NULL;
  END IF;
  SELECT array_agg(n.run_id), array_agg(n.step_slug), array_agg(n.task_index)
    INTO v_runs, v_steps, v_idx
    FROM new_tasks n
    JOIN pgflow_ext.subflow_steps sf ON sf.flow_slug = n.flow_slug AND sf.step_slug = n.step_slug;
  IF v_runs IS NOT NULL THEN
    PERFORM pgflow_private._launch_subflows(v_runs, v_steps, v_idx);
  END IF;
  RETURN NULL;
END;
$$;

CREATE TRIGGER subflow_tasks_inserted
  AFTER INSERT ON pgflow.step_tasks
  REFERENCING NEW TABLE AS new_tasks
  FOR EACH STATEMENT
  EXECUTE FUNCTION pgflow_private._subflow_tasks_inserted();

-- After a task's status changes to queued (a retry), from started to cancelled, or from
-- started without a message (how subflow tasks are stored) to anything: a subflow task's
-- running child cancelled, and for a retry its new child started.
CREATE FUNCTION pgflow_private._subflow_task_changed()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_child record;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pgflow_ext.subflow_steps sf
                  WHERE sf.flow_slug = NEW.flow_slug AND sf.step_slug = NEW.step_slug) THEN
    RETURN NULL;
  END IF;
  -- A task that leaves 'started' any other way than through its child's end (a stale or
  -- hostile complete_task / fail_task) stops its running child first: the child of the
  -- attempt that ended this way has nothing left to report to. A child that ended and
  -- reported is no longer 'started', so the normal path finds nothing here.
  IF OLD.status = 'started' THEN
    FOR v_child IN
      SELECT l.child_run_id, r.flow_slug
        FROM pgflow_ext.subflow_runs l
        JOIN pgflow.runs r ON r.run_id = l.child_run_id
       WHERE l.parent_run_id = NEW.run_id
         AND l.parent_step_slug = NEW.step_slug
         AND l.parent_task_index = NEW.task_index
         AND r.status = 'started'
       ORDER BY l.child_run_id
    LOOP
      PERFORM pgflow._cancel_runs(v_child.flow_slug, ARRAY[v_child.child_run_id]);
    END LOOP;
  END IF;
  IF NEW.status = 'queued' THEN
    PERFORM pgflow_private._launch_subflows(ARRAY[NEW.run_id], ARRAY[NEW.step_slug],
                                            ARRAY[NEW.task_index]);
  END IF;
  RETURN NULL;
END;
$$;

CREATE TRIGGER subflow_task_changed
  AFTER UPDATE OF status ON pgflow.step_tasks
  FOR EACH ROW
  WHEN ((NEW.status = 'queued' AND OLD.status IS DISTINCT FROM 'queued')
        OR (OLD.status = 'started' AND NEW.status = 'cancelled')
        OR (OLD.status = 'started' AND NEW.status <> 'started' AND OLD.message_id IS NULL))
  EXECUTE FUNCTION pgflow_private._subflow_task_changed();

-- -------------------------------------------------------------------------------------
-- Child runs ending
-- -------------------------------------------------------------------------------------

CREATE FUNCTION pgflow_private._subflow_run_ended()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_link    pgflow_ext.subflow_runs;
  v_task    pgflow.step_tasks;
  v_output  text;
  v_failed  record;
  v_message text;
  -- Cancelled by someone, or failed by the depth limit (which would fail the same way on
  -- every attempt, at every level above it: retries would multiply per level).
  v_permanent boolean := NEW.status = 'cancelled';
BEGIN
  SELECT * INTO v_link FROM pgflow_ext.subflow_runs l WHERE l.child_run_id = NEW.run_id;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  SELECT * INTO v_task FROM pgflow.step_tasks t
   WHERE t.run_id = v_link.parent_run_id
     AND t.step_slug = v_link.parent_step_slug
     AND t.task_index = v_link.parent_task_index;
  -- Only the attempt this child was started for hears from it: a retry_run of the parent
  -- counts attempts from 0 again, but starts a newer child.
  IF NOT FOUND OR v_task.status IS DISTINCT FROM 'started'
     OR v_task.attempts_count <> v_link.parent_attempt
     OR EXISTS (SELECT 1 FROM pgflow_ext.subflow_runs n
                 WHERE n.parent_run_id = v_link.parent_run_id
                   AND n.parent_step_slug = v_link.parent_step_slug
                   AND n.parent_task_index = v_link.parent_task_index
                   AND n.created_at > v_link.created_at) THEN
    RETURN NULL;
  END IF;

  IF NEW.status = 'completed' THEN
    SELECT sf.output_step INTO v_output
      FROM pgflow_ext.subflow_steps sf
     WHERE sf.flow_slug = v_task.flow_slug AND sf.step_slug = v_task.step_slug;
    PERFORM pgflow_private.complete_tasks(
      ARRAY[v_task.run_id], ARRAY[v_task.step_slug], ARRAY[v_task.task_index],
      ARRAY[CASE WHEN v_output IS NULL THEN NEW.output
                 ELSE coalesce(NEW.output -> v_output, 'null'::jsonb) END]);
    RETURN NULL;
  END IF;

  IF NEW.status = 'cancelled' THEN
    v_message := format('child run %s of flow %s was cancelled', NEW.run_id, NEW.flow_slug);
  ELSE
    SELECT ss.step_slug, ss.error_message INTO v_failed
      FROM pgflow.step_states ss
     WHERE ss.run_id = NEW.run_id AND ss.status = 'failed'
     ORDER BY ss.failed_at, ss.step_slug
     LIMIT 1;
    v_message := format('child run %s of flow %s failed at step %s: %s', NEW.run_id,
                        NEW.flow_slug, coalesce(v_failed.step_slug, '?'),
                        coalesce(v_failed.error_message, 'no error message'));
    v_permanent := position('subflow depth limit: ' IN coalesce(v_failed.error_message, '')) > 0;
  END IF;
  PERFORM pgflow_private.fail_task(v_task.run_id, v_task.step_slug, v_task.task_index,
    v_message, v_task.attempts_count, NULL, v_permanent, NULL);
  RETURN NULL;
END;
$$;

-- -------------------------------------------------------------------------------------
-- A child run deleted under its parent
-- -------------------------------------------------------------------------------------

-- After runs are deleted (delete_flow_and_data of their flow, as compile_replacing does):
-- a parent task still waiting for a child that is gone fails for good, through the normal
-- fail path (no retry: the child flow was replaced or removed), so the parent never waits
-- forever. Found after the statement, not per row: failing a parent cancels its other
-- children, which the same statement may be deleting (a row trigger would modify rows the
-- statement is about to delete). A started subflow task always has a started child; one
-- of a deleted flow's parent steps without one lost it to this delete.
CREATE FUNCTION pgflow_private._subflow_runs_deleted()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
  v_task record;
BEGIN
  FOR v_task IN
    SELECT t.run_id, t.step_slug, t.task_index, sf.child_flow_slug
      FROM (SELECT DISTINCT o.flow_slug FROM deleted_runs o) d
      JOIN pgflow_ext.subflow_steps sf ON sf.child_flow_slug = d.flow_slug
      JOIN pgflow.step_tasks t ON t.flow_slug = sf.flow_slug AND t.step_slug = sf.step_slug
      JOIN pgflow.runs pr ON pr.run_id = t.run_id
     WHERE t.status = 'started'
       AND t.message_id IS NULL
       AND pr.status = 'started'
       AND NOT EXISTS (SELECT 1 FROM pgflow_ext.subflow_runs l
                         JOIN pgflow.runs c ON c.run_id = l.child_run_id
                        WHERE l.parent_run_id = t.run_id
                          AND l.parent_step_slug = t.step_slug
                          AND l.parent_task_index = t.task_index
                          AND c.status = 'started')
     ORDER BY t.run_id, t.step_slug, t.task_index
  LOOP
    -- An earlier failure of this loop may have failed the run and cancelled this task.
    PERFORM pgflow_private.fail_task(t.run_id, t.step_slug, t.task_index,
      format('its child run of flow %s was deleted', v_task.child_flow_slug),
      t.attempts_count, NULL, true, NULL)
      FROM pgflow.step_tasks t
     WHERE t.run_id = v_task.run_id
       AND t.step_slug = v_task.step_slug
       AND t.task_index = v_task.task_index
       AND t.status = 'started';
  END LOOP;
  RETURN NULL;
END;
$$;

CREATE TRIGGER subflow_runs_deleted
  AFTER DELETE ON pgflow.runs
  REFERENCING OLD TABLE AS deleted_runs
  FOR EACH STATEMENT
  EXECUTE FUNCTION pgflow_private._subflow_runs_deleted();

-- -------------------------------------------------------------------------------------
-- Limits do not apply to subflow steps
-- -------------------------------------------------------------------------------------

-- Child runs start from a trigger, not through 0014's limited start path: a concurrency or
-- rate limit on a subflow step would be accepted and ignored, so it is refused.
CREATE FUNCTION pgflow_private._subflow_step_limited()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM pgflow_ext.subflow_steps sf
              WHERE sf.flow_slug = NEW.flow_slug AND sf.step_slug = NEW.step_slug) THEN
    RAISE EXCEPTION 'step %.% is a subflow step: it cannot have concurrency or rate limits (limit the child flow''s steps instead)',
      NEW.flow_slug, NEW.step_slug
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN NEW;
END;
$$;

-- Only when a row comes to name a step: a limited read updates its limit rows in place
-- (0014, F4), and no existing row can name a subflow step (set_subflow refuses limited ones).
CREATE TRIGGER subflow_step_limited
  BEFORE INSERT OR UPDATE OF flow_slug, step_slug ON pgflow_ext.step_limits
  FOR EACH ROW
  EXECUTE FUNCTION pgflow_private._subflow_step_limited();

CREATE TRIGGER subflow_run_ended
  AFTER UPDATE OF status ON pgflow.runs
  FOR EACH ROW
  WHEN (OLD.status = 'started' AND NEW.status IN ('completed', 'failed', 'cancelled'))
  EXECUTE FUNCTION pgflow_private._subflow_run_ended();

-- -------------------------------------------------------------------------------------
-- The stalled-task sweep passes over subflow tasks
-- -------------------------------------------------------------------------------------

-- 0010's requeue_stalled_tasks, unchanged but for message_id IS NOT NULL: a task without
-- a message (a subflow task, run by its child, not by a worker) has no worker to lose,
-- and its step's timeout does not apply to it.
CREATE OR REPLACE FUNCTION pgflow.requeue_stalled_tasks()
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
       AND t.message_id IS NOT NULL
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

-- -------------------------------------------------------------------------------------
-- Reading: a run's children
-- -------------------------------------------------------------------------------------

-- The child runs started for run_id's subflow tasks, oldest first: the step and task that
-- started each, the attempt, and the child's flow, status and depth.
CREATE FUNCTION pgflow.run_children(run_id uuid)
RETURNS TABLE (
  child_run_id      uuid,
  child_flow_slug   text,
  status            text,
  step_slug         text,
  task_index        integer,
  attempt           integer,
  depth             integer,
  started_at        timestamptz
)
LANGUAGE sql
STABLE
SET search_path = ''
AS $$
  SELECT l.child_run_id, r.flow_slug, r.status, l.parent_step_slug, l.parent_task_index,
         l.parent_attempt, l.depth, r.started_at
    FROM pgflow_ext.subflow_runs l
    JOIN pgflow.runs r ON r.run_id = l.child_run_id
   WHERE l.parent_run_id = run_children.run_id
   ORDER BY l.created_at, l.parent_step_slug, l.parent_task_index
$$;

-- -------------------------------------------------------------------------------------
-- Privileges: the owner's until granted (docs/security.md)
-- -------------------------------------------------------------------------------------

REVOKE EXECUTE ON FUNCTION
  pgflow.set_subflow(text, text, text, text),
  pgflow.run_children(uuid),
  pgflow_private._launch_subflows(uuid[], text[], integer[]),
  pgflow_private._subflow_tasks_inserted(),
  pgflow_private._subflow_task_changed(),
  pgflow_private._subflow_run_ended(),
  pgflow_private._subflow_runs_deleted(),
  pgflow_private._subflow_step_limited()
  FROM public;
