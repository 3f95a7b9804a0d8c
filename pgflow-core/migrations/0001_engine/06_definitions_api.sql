-- -------------------------------------------------------------------------------------
-- Definitions API
-- -------------------------------------------------------------------------------------

CREATE FUNCTION pgflow.create_flow(
  flow_slug    text,
  max_attempts integer DEFAULT 3,
  base_delay   integer DEFAULT 5,
  timeout      integer DEFAULT 60
)
RETURNS pgflow.flows
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_flow pgflow.flows;
BEGIN
  INSERT INTO pgflow.flows (flow_slug, opt_max_attempts, opt_base_delay, opt_timeout)
  VALUES (create_flow.flow_slug, create_flow.max_attempts, create_flow.base_delay, create_flow.timeout)
  ON CONFLICT ON CONSTRAINT flows_pkey DO NOTHING
  RETURNING * INTO v_flow;

  IF NOT FOUND THEN
    SELECT * INTO v_flow FROM pgflow.flows f WHERE f.flow_slug = create_flow.flow_slug;
  END IF;

  -- Checked first: pgmq.create would take an advisory lock and run DDL every time.
  IF NOT EXISTS (
    SELECT 1 FROM pgmq.list_queues() q WHERE q.queue_name = create_flow.flow_slug
  ) THEN
    PERFORM pgmq.create(create_flow.flow_slug);
    PERFORM pgflow._create_queue_functions(create_flow.flow_slug);
  ELSIF pgflow._queue_function('read', create_flow.flow_slug) IS NULL
     OR pgflow._queue_function('send', create_flow.flow_slug) IS NULL THEN
    -- A queue made before its flow, or by an installation without these functions.
    PERFORM pgflow._create_queue_functions(create_flow.flow_slug);
  END IF;

  RETURN v_flow;
END;
$$;

CREATE FUNCTION pgflow.add_step(
  flow_slug    text,
  step_slug    text,
  deps_slugs   text[]  DEFAULT '{}',
  max_attempts integer DEFAULT NULL,
  base_delay   integer DEFAULT NULL,
  timeout      integer DEFAULT NULL,
  start_delay  integer DEFAULT NULL,
  step_type    text    DEFAULT 'single'
)
RETURNS pgflow.steps
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_deps text[] := coalesce(add_step.deps_slugs, '{}');
  v_step pgflow.steps;
BEGIN
  IF add_step.step_type = 'map' AND cardinality(v_deps) > 1 THEN
    RAISE EXCEPTION 'Map step "%" can have at most one dependency, but % were provided: %',
      add_step.step_slug, cardinality(v_deps), array_to_string(v_deps, ', ');
  END IF;

  -- Serialises definitions of one flow so step_index stays dense and ordered. An
  -- unknown flow finds no row here and fails on steps_flow_slug_fkey below.
  PERFORM 1 FROM pgflow.flows f WHERE f.flow_slug = add_step.flow_slug FOR NO KEY UPDATE;

  SELECT * INTO v_step
    FROM pgflow.steps s
   WHERE s.flow_slug = add_step.flow_slug
     AND s.step_slug = add_step.step_slug;
  IF FOUND THEN
    RETURN v_step;
  END IF;

  INSERT INTO pgflow.steps (
    flow_slug, step_slug, step_type, step_index, deps_count,
    opt_max_attempts, opt_base_delay, opt_timeout, opt_start_delay
  )
  VALUES (
    add_step.flow_slug, add_step.step_slug, add_step.step_type,
    (SELECT coalesce(max(s.step_index) + 1, 0) FROM pgflow.steps s
      WHERE s.flow_slug = add_step.flow_slug),
    cardinality(v_deps),
    add_step.max_attempts, add_step.base_delay, add_step.timeout, add_step.start_delay
  )
  RETURNING * INTO v_step;

  INSERT INTO pgflow.deps (flow_slug, dep_slug, step_slug)
  SELECT add_step.flow_slug, d.dep_slug, add_step.step_slug
    FROM unnest(v_deps) AS d(dep_slug);

  RETURN v_step;
END;
$$;

