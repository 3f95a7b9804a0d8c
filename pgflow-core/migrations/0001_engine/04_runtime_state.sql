-- -------------------------------------------------------------------------------------
-- Runtime state: runs, step_states, step_tasks
-- -------------------------------------------------------------------------------------

CREATE TABLE pgflow.runs (
  run_id          uuid        NOT NULL DEFAULT gen_random_uuid(),
  flow_slug       text        NOT NULL,
  status          text        NOT NULL DEFAULT 'started',
  input           jsonb       NOT NULL,
  output          jsonb,
  remaining_steps integer     NOT NULL DEFAULT 0,
  started_at      timestamptz NOT NULL DEFAULT now(),
  completed_at    timestamptz,
  failed_at       timestamptz,
  CONSTRAINT runs_pkey PRIMARY KEY (run_id),
  CONSTRAINT runs_flow_slug_fkey FOREIGN KEY (flow_slug) REFERENCES pgflow.flows (flow_slug),
  CONSTRAINT status_is_valid CHECK (status IN ('started', 'completed', 'failed')),
  CONSTRAINT runs_remaining_steps_check CHECK (remaining_steps >= 0),
  CONSTRAINT completed_at_or_failed_at CHECK (NOT (completed_at IS NOT NULL AND failed_at IS NOT NULL)),
  CONSTRAINT completed_at_is_after_started_at CHECK (completed_at IS NULL OR completed_at >= started_at),
  CONSTRAINT failed_at_is_after_started_at CHECK (failed_at IS NULL OR failed_at >= started_at)
);

-- For the monitoring queries users already run (runs per flow, per status).
CREATE INDEX idx_runs_flow_slug ON pgflow.runs (flow_slug);
CREATE INDEX idx_runs_status ON pgflow.runs (status);

-- step_states and step_tasks rows are updated two or three times each, always by primary
-- key: pages keep 30% free so that the new versions fit beside the old ones (HOT updates,
-- no new index entries).
CREATE TABLE pgflow.step_states (
  flow_slug       text        NOT NULL,
  run_id          uuid        NOT NULL,
  step_slug       text        NOT NULL,
  status          text        NOT NULL DEFAULT 'created',
  remaining_tasks integer,
  initial_tasks   integer,
  remaining_deps  integer     NOT NULL DEFAULT 0,
  error_message   text,
  created_at      timestamptz NOT NULL DEFAULT now(),
  started_at      timestamptz,
  completed_at    timestamptz,
  failed_at       timestamptz,
  CONSTRAINT step_states_pkey PRIMARY KEY (run_id, step_slug),
  CONSTRAINT step_states_run_id_fkey FOREIGN KEY (run_id) REFERENCES pgflow.runs (run_id),
  CONSTRAINT step_states_flow_slug_step_slug_fkey FOREIGN KEY (flow_slug, step_slug)
    REFERENCES pgflow.steps (flow_slug, step_slug),
  CONSTRAINT status_is_valid CHECK (status IN ('created', 'started', 'completed', 'failed')),
  CONSTRAINT step_states_remaining_deps_check CHECK (remaining_deps >= 0),
  CONSTRAINT step_states_initial_tasks_check CHECK (initial_tasks IS NULL OR initial_tasks >= 0),
  CONSTRAINT initial_tasks_known_when_started CHECK (status <> 'started' OR initial_tasks IS NOT NULL),
  CONSTRAINT remaining_tasks_state_consistency CHECK (remaining_tasks IS NULL OR status <> 'created'),
  CONSTRAINT status_and_remaining_tasks_match CHECK (status <> 'completed' OR remaining_tasks = 0),
  CONSTRAINT completed_at_or_failed_at CHECK (NOT (completed_at IS NOT NULL AND failed_at IS NOT NULL)),
  CONSTRAINT started_at_is_after_created_at CHECK (started_at IS NULL OR started_at >= created_at),
  CONSTRAINT completed_at_is_after_started_at CHECK (completed_at IS NULL OR completed_at >= started_at),
  CONSTRAINT failed_at_is_after_started_at CHECK (failed_at IS NULL OR failed_at >= started_at)
) WITH (fillfactor = 70);

-- Deliberately no partial index on status (ready steps, failed steps): a column in an
-- index predicate makes every update of it a non-HOT update, and each step state changes
-- status two or three times; the dead entries such an index gathers under load are what
-- a scan of it then reads. The primary key's run_id prefix finds a run's steps.

CREATE TABLE pgflow.step_tasks (
  flow_slug      text        NOT NULL,
  run_id         uuid        NOT NULL,
  step_slug      text        NOT NULL,
  message_id     bigint,
  task_index     integer     NOT NULL DEFAULT 0,
  status         text        NOT NULL DEFAULT 'queued',
  attempts_count integer     NOT NULL DEFAULT 0,
  error_message  text,
  output         jsonb,
  queued_at      timestamptz NOT NULL DEFAULT now(),
  started_at     timestamptz,
  completed_at   timestamptz,
  failed_at      timestamptz,
  last_worker_id uuid,
  CONSTRAINT step_tasks_pkey PRIMARY KEY (run_id, step_slug, task_index),
  CONSTRAINT step_tasks_run_id_step_slug_fkey FOREIGN KEY (run_id, step_slug)
    REFERENCES pgflow.step_states (run_id, step_slug),
  CONSTRAINT step_tasks_last_worker_id_fkey FOREIGN KEY (last_worker_id)
    REFERENCES pgflow.workers (worker_id) ON DELETE SET NULL,
  CONSTRAINT valid_status CHECK (status IN ('queued', 'started', 'completed', 'failed')),
  CONSTRAINT output_valid_only_for_completed CHECK (output IS NULL OR status IN ('completed', 'failed')),
  CONSTRAINT attempts_count_nonnegative CHECK (attempts_count >= 0),
  CONSTRAINT completed_at_or_failed_at CHECK (NOT (completed_at IS NOT NULL AND failed_at IS NOT NULL)),
  CONSTRAINT started_at_is_after_queued_at CHECK (started_at IS NULL OR started_at >= queued_at),
  CONSTRAINT completed_at_is_after_started_at CHECK (completed_at IS NULL OR completed_at >= started_at),
  CONSTRAINT failed_at_is_after_started_at CHECK (failed_at IS NULL OR failed_at >= started_at)
) WITH (fillfactor = 70);

-- start_tasks finds tasks by the pgmq message ids a worker just read.
CREATE INDEX idx_step_tasks_message_id ON pgflow.step_tasks (message_id);
-- Tasks of a run / of a step: the primary key. Deliberately no partial index on status:
-- status changes on every task transition, and such an index would make every update a
-- non-HOT one and tempt the planner away from primary-key lookups on small tables.

-- What _start_tasks returns: a step_task_record plus what a worker needs to run the task
-- (its attempt number, counting this one, and the step's timeout in seconds).
CREATE TYPE pgflow._started_task AS (
  flow_slug  text,
  run_id     uuid,
  step_slug  text,
  input      jsonb,
  msg_id     bigint,
  task_index integer,
  attempt    integer,
  timeout    integer
);

CREATE TYPE pgflow.step_task_record AS (
  flow_slug  text,
  run_id     uuid,
  step_slug  text,
  input      jsonb,
  msg_id     bigint,
  task_index integer
);

