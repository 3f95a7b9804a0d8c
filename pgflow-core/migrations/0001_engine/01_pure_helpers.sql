-- -------------------------------------------------------------------------------------
-- Pure helpers (needed by the check constraints below)
-- -------------------------------------------------------------------------------------

CREATE FUNCTION pgflow.is_valid_slug(slug text)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
SET search_path = ''
AS $$
  SELECT coalesce(
    slug <> ''
      AND length(slug) <= 128
      AND slug ~ '^[a-zA-Z_][a-zA-Z0-9_]*$'
      AND slug <> 'run',   -- `run` is the key of the flow input in every step input
    false
  )
$$;

CREATE FUNCTION pgflow.calculate_retry_delay(base_delay numeric, attempts_count integer)
RETURNS integer
LANGUAGE sql
IMMUTABLE
SET search_path = ''
AS $$
  SELECT floor(base_delay * power(2::numeric, attempts_count))::integer
$$;

