-- The per-task protocol's floor: a lean stand-in for an engine, answering the three calls of
-- pgflow's TypeScript worker (pgmq.read, start_tasks, complete_task) for two flows with what
-- pgflow 0.8.1's contract makes every engine do, and nothing more. c5 is a chain of five steps;
-- fo is a root map whose runs have 1,000 tasks each.
--
-- start_tasks marks the tasks started, hides their messages for the step's timeout (as 0.8.1's
-- set_vt_batch does) and returns each task's input: the run's input and the previous step's
-- output (c5), or element task_index of the run's input (fo). complete_task stores the task's
-- output and archives its message (0.8.1 archives, it does not delete), then queues the
-- successor (c5, a row and a message), completes the run after its last step (c5), or takes
-- one from the run's count of remaining tasks, the row every completion of a run must update
-- and hold until commit (fo; step_states.remaining_tasks in 0.8.1), completing the run at zero.
-- No step states, dependencies, events, retries or checks. PL/pgSQL throughout, so that every
-- statement's plan is cached per session. Installed by run.sh into a database with pgmq only.
CREATE SCHEMA pgflow;

CREATE TABLE pgflow.runs (
  run_id    uuid PRIMARY KEY,
  input     jsonb NOT NULL,
  remaining integer NOT NULL,
  status    text NOT NULL DEFAULT 'started',
  output    jsonb
);

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

-- 0.8.1's row of a started task.
CREATE TYPE pgflow.step_task_record AS (
  flow_slug  text,
  run_id     uuid,
  step_slug  text,
  input      jsonb,
  msg_id     bigint,
  task_index integer
);

SELECT pgmq.create('c5');
SELECT pgmq.create('fo');

CREATE FUNCTION pgflow.start_tasks(flow_slug text, msg_ids bigint[], worker_id uuid)
RETURNS SETOF pgflow.step_task_record
LANGUAGE plpgsql
AS $$
BEGIN
  -- The messages stay hidden for the step's timeout (60 s) + 2 s, as set_vt_batch does.
  IF start_tasks.flow_slug = 'c5' THEN
    UPDATE pgmq.q_c5 q SET vt = clock_timestamp() + interval '62 seconds'
     WHERE q.msg_id = ANY(start_tasks.msg_ids);
  ELSE
    UPDATE pgmq.q_fo q SET vt = clock_timestamp() + interval '62 seconds'
     WHERE q.msg_id = ANY(start_tasks.msg_ids);
  END IF;
  RETURN QUERY
  WITH started AS (
    UPDATE pgflow.tasks t
       SET status = 'started', attempts = t.attempts + 1, started_at = now()
     WHERE t.msg_id = ANY(start_tasks.msg_ids) AND t.queue = start_tasks.flow_slug
    RETURNING t.run_id, t.step, t.task_index, t.msg_id
  )
  SELECT start_tasks.flow_slug, s.run_id, 's' || s.step,
         CASE
           WHEN start_tasks.flow_slug = 'fo' THEN r.input -> s.task_index
           WHEN s.step = 1 THEN jsonb_build_object('run', r.input)
           ELSE jsonb_build_object('run', r.input, 's' || (s.step - 1), p.output)
         END,
         s.msg_id, s.task_index
    FROM started s
    JOIN pgflow.runs r ON r.run_id = s.run_id
    LEFT JOIN pgflow.tasks p
      ON p.run_id = s.run_id AND p.step = s.step - 1 AND p.task_index = 0;
END;
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
    UPDATE pgflow.runs r
       SET remaining = r.remaining - 1,
           status = CASE WHEN r.remaining = 1 THEN 'completed' ELSE r.status END
     WHERE r.run_id = complete_task.run_id;
  ELSIF v_step < 5 THEN
    INSERT INTO pgflow.tasks (msg_id, queue, run_id, step, task_index)
    SELECT m, 'c5', complete_task.run_id, v_step + 1, 0
      FROM pgmq.send('c5', jsonb_build_object('run_id', complete_task.run_id)) AS m;
  ELSE
    UPDATE pgflow.runs r
       SET remaining = 0, status = 'completed', output = complete_task.output
     WHERE r.run_id = complete_task.run_id;
  END IF;
  PERFORM pgmq.archive(v_task.queue, v_task.msg_id);
  RETURN NEXT v_task;
END;
$$;

-- What start_flow does for n runs: c5's first task, or fo's 1,000 tasks, queued.
CREATE FUNCTION pgflow.start_runs(flow_slug text, n integer)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
  v_run uuid;
BEGIN
  FOR i IN 1..n LOOP
    v_run := gen_random_uuid();
    IF start_runs.flow_slug = 'fo' THEN
      INSERT INTO pgflow.runs (run_id, input, remaining)
      SELECT v_run, jsonb_agg(x), 1000 FROM generate_series(1, 1000) x;
      INSERT INTO pgflow.tasks (msg_id, queue, run_id, step, task_index)
      SELECT m.id, 'fo', v_run, 1, m.ord - 1
        FROM pgmq.send_batch('fo', ARRAY(SELECT jsonb_build_object('run_id', v_run)
                                           FROM generate_series(1, 1000)))
             WITH ORDINALITY AS m(id, ord);
    ELSE
      INSERT INTO pgflow.runs (run_id, input, remaining)
      VALUES (v_run, jsonb_build_object('i', i), 5);
      INSERT INTO pgflow.tasks (msg_id, queue, run_id, step, task_index)
      SELECT m, 'c5', v_run, 1, 0
        FROM pgmq.send('c5', jsonb_build_object('run_id', v_run)) AS m;
    END IF;
  END LOOP;
END;
$$;
