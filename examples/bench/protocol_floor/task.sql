-- One task of the per-task protocol (pgflow's TypeScript worker with a batch of one) on flow
-- :flow: read one message, start its task, complete it; three transactions. Run by run.sh
-- with -M prepared and -D flow=<slug>.
select msg_id as m from pgmq.read(:flow, 30, 1) \gset
select run_id as r, step_slug as s, task_index as t from pgflow.start_tasks(:flow, ARRAY[:m]::bigint[], '00000000-0000-0000-0000-000000000001') \gset
select 1 from pgflow.complete_task(:r, :s, :t, '1'::jsonb);
