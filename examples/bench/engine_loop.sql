-- The engine alone, in one session: chain5 tasks read, started and completed in batches of 10
-- by a PL/pgSQL loop (no network, no worker), one commit per batch, timing each call.
--
--   pgflow install --database-url "$URL"     # a fresh database
--   psql "$URL" -f examples/bench/engine_loop.sql
--
-- Prints the time of starting 1,000 runs (after 3,000 that warm up and grow the tables), then
-- per task: reading the queue (pgmq.read), start_tasks, and complete_tasks.
\set QUIET on
\set ON_ERROR_STOP on

SELECT pgflow.create_flow('loop_chain5');
SELECT pgflow.add_step('loop_chain5', 's1');
SELECT pgflow.add_step('loop_chain5', 's2', ARRAY['s1']);
SELECT pgflow.add_step('loop_chain5', 's3', ARRAY['s2']);
SELECT pgflow.add_step('loop_chain5', 's4', ARRAY['s3']);
SELECT pgflow.add_step('loop_chain5', 's5', ARRAY['s4']);
INSERT INTO pgflow.workers (worker_id, queue_name, function_name)
VALUES ('00000000-0000-0000-0000-00000000100b', 'loop_chain5', 'engine_loop.sql');

-- The input differs per run so that start_flow is called once per row.
SELECT count(*)
  FROM generate_series(1, 3000) AS g,
       LATERAL pgflow.start_flow('loop_chain5', jsonb_build_object('i', g));

\timing on
SELECT count(*)
  FROM generate_series(1, 1000) AS g,
       LATERAL pgflow.start_flow('loop_chain5', jsonb_build_object('i', g));
\timing off

DO $$
DECLARE
  v_ids     bigint[];
  v_task    record;
  v_runs    uuid[];
  v_steps   text[];
  v_indexes integer[];
  v_outputs jsonb[];
  v_t0      timestamptz;
  v_read    float8 := 0;
  v_start   float8 := 0;
  v_done    float8 := 0;
  v_n       integer := 0;
BEGIN
  FOR i IN 1 .. 300 LOOP
    v_t0 := clock_timestamp();
    v_ids := ARRAY(SELECT m.msg_id FROM pgmq.read('loop_chain5', 30, 10) m);
    v_read := v_read + extract(epoch FROM clock_timestamp() - v_t0);

    v_t0 := clock_timestamp();
    v_runs := '{}'; v_steps := '{}'; v_indexes := '{}'; v_outputs := '{}';
    FOR v_task IN
      SELECT * FROM pgflow.start_tasks('loop_chain5', v_ids, '00000000-0000-0000-0000-00000000100b')
    LOOP
      v_runs := v_runs || v_task.run_id;
      v_steps := v_steps || v_task.step_slug;
      v_indexes := v_indexes || v_task.task_index;
      v_outputs := v_outputs || '{"x": 1}'::jsonb;
    END LOOP;
    v_n := v_n + cardinality(v_runs);
    v_start := v_start + extract(epoch FROM clock_timestamp() - v_t0);

    v_t0 := clock_timestamp();
    PERFORM count(*) FROM pgflow.complete_tasks(v_runs, v_steps, v_indexes, v_outputs);
    v_done := v_done + extract(epoch FROM clock_timestamp() - v_t0);
    COMMIT;
  END LOOP;
  RAISE NOTICE 'per task (% tasks): read % us, start_tasks % us, complete_tasks % us', v_n,
    round((v_read * 1e6 / v_n)::numeric, 1), round((v_start * 1e6 / v_n)::numeric, 1),
    round((v_done * 1e6 / v_n)::numeric, 1);
END;
$$;
