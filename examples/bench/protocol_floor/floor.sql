-- The per-task protocol's floor: a stand-in for an engine that answers the three calls of
-- pgflow's TypeScript worker (pgmq.read, start_tasks, complete_task) for a chain of five
-- steps with the least any engine must write. Starting a task updates its row; completing it
-- updates its row, queues its successor (a row and a pgmq message) and archives its message.
-- No runs, no step states, no dependencies, no events, no checks: nothing an engine could
-- leave out and still be one. Installed by run.sh into a database that has pgmq only.
CREATE SCHEMA pgflow;

CREATE TABLE pgflow.tasks (
  msg_id       bigint PRIMARY KEY,
  run_id       uuid NOT NULL,
  step         integer NOT NULL,
  status       text NOT NULL DEFAULT 'queued',
  attempts     integer NOT NULL DEFAULT 0,
  output       jsonb,
  started_at   timestamptz,
  completed_at timestamptz,
  UNIQUE (run_id, step)
);

SELECT pgmq.create('c5');

CREATE FUNCTION pgflow.start_tasks(flow_slug text, msg_ids bigint[], worker_id uuid)
RETURNS TABLE (run_id uuid, step_slug text, task_index integer)
LANGUAGE sql
AS $$
  UPDATE pgflow.tasks t
     SET status = 'started', attempts = t.attempts + 1, started_at = now()
   WHERE t.msg_id = ANY(start_tasks.msg_ids)
  RETURNING t.run_id, 's' || t.step, 0
$$;

CREATE FUNCTION pgflow.complete_task(run_id uuid, step_slug text, task_index integer, output jsonb)
RETURNS SETOF pgflow.tasks
LANGUAGE plpgsql
AS $$
DECLARE
  v_step integer := substr(complete_task.step_slug, 2)::integer;
  v_task pgflow.tasks;
BEGIN
  UPDATE pgflow.tasks t
     SET status = 'completed', output = complete_task.output, completed_at = now()
   WHERE t.run_id = complete_task.run_id AND t.step = v_step
  RETURNING * INTO v_task;
  IF v_step < 5 THEN
    INSERT INTO pgflow.tasks (msg_id, run_id, step)
    SELECT m, complete_task.run_id, v_step + 1
      FROM pgmq.send('c5', jsonb_build_object('run_id', complete_task.run_id)) AS m;
  END IF;
  PERFORM pgmq.archive('c5', v_task.msg_id);
  RETURN NEXT v_task;
END;
$$;

-- What start_flow does for n runs of the chain: the first step's tasks, queued.
CREATE FUNCTION pgflow.start_runs(n integer)
RETURNS void
LANGUAGE sql
AS $$
  INSERT INTO pgflow.tasks (msg_id, run_id, step)
  SELECT (SELECT m FROM pgmq.send('c5', jsonb_build_object('run_id', r)) AS m), r, 1
    FROM (SELECT gen_random_uuid() AS r FROM generate_series(1, n)) s
$$;
