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

