-- The per-task protocol's floor: a stand-in for an engine that answers the three calls of
-- pgflow's TypeScript worker (pgmq.read, start_tasks, complete_task) with the least any engine
-- must write, for two flows: c5, a chain of five steps, and fo, a root map whose runs have 1,000
-- tasks each. Starting a task updates its row. Completing it updates its row, archives its
-- message, and then: in c5, queues its successor (a row and a pgmq message); in fo, takes one
-- from its run's count of remaining tasks, the one row every completion of a run must update
-- under pgflow 0.8.1's contract (step_states.remaining_tasks drops by one per completion), held
-- until commit. No runs, step states, dependencies, events or checks beyond that: nothing an
-- engine could leave out and still be one. Installed by run.sh into a database with pgmq only.
CREATE SCHEMA pgflow;

CREATE TABLE pgflow.tasks (
  msg_id       bigint NOT NULL,
  queue        text NOT NULL,
  run_id       uuid NOT NULL,
  step         integer NOT NULL,
  task_index   integer NOT NULL,
  status       text NOT NULL DEFAULT 'queued',
  attempts     integer NOT NULL DEFAULT 0,
  output       jsonb,
  started_at   timestamptz,
  completed_at timestamptz,
  PRIMARY KEY (run_id, step, task_index),
  UNIQUE (msg_id, queue)
);

CREATE TABLE pgflow.remaining (
  run_id uuid PRIMARY KEY,
  tasks  integer NOT NULL
);

SELECT pgmq.create('c5');
SELECT pgmq.create('fo');

CREATE FUNCTION pgflow.start_tasks(flow_slug text, msg_ids bigint[], worker_id uuid)
RETURNS TABLE (run_id uuid, step_slug text, task_index integer)
LANGUAGE sql
AS $$
  UPDATE pgflow.tasks t
     SET status = 'started', attempts = t.attempts + 1, started_at = now()
   WHERE t.msg_id = ANY(start_tasks.msg_ids) AND t.queue = start_tasks.flow_slug
  RETURNING t.run_id, 's' || t.step, t.task_index
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
     AND t.task_index = complete_task.task_index
  RETURNING * INTO v_task;
  IF v_task.queue = 'fo' THEN
    UPDATE pgflow.remaining r SET tasks = r.tasks - 1 WHERE r.run_id = complete_task.run_id;
  ELSIF v_step < 5 THEN
    INSERT INTO pgflow.tasks (msg_id, queue, run_id, step, task_index)
    SELECT m, 'c5', complete_task.run_id, v_step + 1, 0
      FROM pgmq.send('c5', jsonb_build_object('run_id', complete_task.run_id)) AS m;
  END IF;
  PERFORM pgmq.archive(v_task.queue, v_task.msg_id);
  RETURN NEXT v_task;
END;
$$;

-- What start_flow does for n runs: c5's first step's task, or fo's 1,000 tasks, queued.
CREATE FUNCTION pgflow.start_runs(flow_slug text, n integer)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
  v_run uuid;
BEGIN
  FOR i IN 1..n LOOP
    v_run := gen_random_uuid();
    IF flow_slug = 'fo' THEN
      INSERT INTO pgflow.remaining VALUES (v_run, 1000);
      INSERT INTO pgflow.tasks (msg_id, queue, run_id, step, task_index)
      SELECT m.id, 'fo', v_run, 1, m.ord - 1
        FROM pgmq.send_batch('fo', ARRAY(SELECT jsonb_build_object('run_id', v_run)
                                           FROM generate_series(1, 1000)))
             WITH ORDINALITY AS m(id, ord);
    ELSE
      INSERT INTO pgflow.tasks (msg_id, queue, run_id, step, task_index)
      SELECT m, 'c5', v_run, 1, 0
        FROM pgmq.send('c5', jsonb_build_object('run_id', v_run)) AS m;
    END IF;
  END LOOP;
END;
$$;
