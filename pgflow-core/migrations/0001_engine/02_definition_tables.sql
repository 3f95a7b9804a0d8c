-- -------------------------------------------------------------------------------------
-- Definitions: flows, steps, deps
-- -------------------------------------------------------------------------------------

CREATE TABLE pgflow.flows (
  flow_slug        text        NOT NULL,
  opt_max_attempts integer     NOT NULL DEFAULT 3,
  opt_base_delay   integer     NOT NULL DEFAULT 1,
  opt_timeout      integer     NOT NULL DEFAULT 60,
  created_at       timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT flows_pkey PRIMARY KEY (flow_slug),
  CONSTRAINT slug_is_valid CHECK (pgflow.is_valid_slug(flow_slug)),
  CONSTRAINT opt_max_attempts_is_nonnegative CHECK (opt_max_attempts >= 0),
  CONSTRAINT opt_base_delay_is_nonnegative CHECK (opt_base_delay >= 0),
  CONSTRAINT opt_timeout_is_positive CHECK (opt_timeout > 0)
);

CREATE TABLE pgflow.steps (
  flow_slug        text        NOT NULL,
  step_slug        text        NOT NULL,
  step_type        text        NOT NULL DEFAULT 'single',
  step_index       integer     NOT NULL DEFAULT 0,
  deps_count       integer     NOT NULL DEFAULT 0,
  opt_max_attempts integer,
  opt_base_delay   integer,
  opt_timeout      integer,
  opt_start_delay  integer,
  created_at       timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT steps_pkey PRIMARY KEY (flow_slug, step_slug),
  CONSTRAINT steps_flow_slug_step_index_key UNIQUE (flow_slug, step_index),
  CONSTRAINT steps_flow_slug_fkey FOREIGN KEY (flow_slug) REFERENCES pgflow.flows (flow_slug),
  CONSTRAINT steps_step_slug_check CHECK (pgflow.is_valid_slug(step_slug)),
  CONSTRAINT steps_step_type_check CHECK (step_type IN ('single', 'map')),
  CONSTRAINT steps_deps_count_check CHECK (deps_count >= 0),
  CONSTRAINT opt_max_attempts_is_nonnegative CHECK (opt_max_attempts IS NULL OR opt_max_attempts >= 0),
  CONSTRAINT opt_base_delay_is_nonnegative CHECK (opt_base_delay IS NULL OR opt_base_delay >= 0),
  CONSTRAINT opt_timeout_is_positive CHECK (opt_timeout IS NULL OR opt_timeout > 0),
  CONSTRAINT opt_start_delay_is_nonnegative CHECK (opt_start_delay IS NULL OR opt_start_delay >= 0)
);

CREATE TABLE pgflow.deps (
  flow_slug  text        NOT NULL,
  dep_slug   text        NOT NULL,
  step_slug  text        NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT deps_pkey PRIMARY KEY (flow_slug, dep_slug, step_slug),
  CONSTRAINT deps_flow_slug_fkey FOREIGN KEY (flow_slug) REFERENCES pgflow.flows (flow_slug),
  CONSTRAINT deps_flow_slug_dep_slug_fkey FOREIGN KEY (flow_slug, dep_slug)
    REFERENCES pgflow.steps (flow_slug, step_slug),
  CONSTRAINT deps_flow_slug_step_slug_fkey FOREIGN KEY (flow_slug, step_slug)
    REFERENCES pgflow.steps (flow_slug, step_slug),
  CONSTRAINT deps_check CHECK (dep_slug <> step_slug)
);

-- The primary key serves "dependents of a step"; this one serves "dependencies of a step"
-- (building a step's input).
CREATE INDEX idx_deps_by_flow_step ON pgflow.deps (flow_slug, step_slug);

