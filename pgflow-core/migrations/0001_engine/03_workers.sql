-- -------------------------------------------------------------------------------------
-- Workers
-- -------------------------------------------------------------------------------------

CREATE TABLE pgflow.workers (
  worker_id         uuid        NOT NULL,
  queue_name        text        NOT NULL,
  function_name     text        NOT NULL,
  started_at        timestamptz NOT NULL DEFAULT now(),
  deprecated_at     timestamptz,
  last_heartbeat_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT workers_pkey PRIMARY KEY (worker_id)
);

