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

