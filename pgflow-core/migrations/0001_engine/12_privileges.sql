-- -------------------------------------------------------------------------------------
-- Privileges: nothing for public; the installer (or the user) grants explicitly.
-- -------------------------------------------------------------------------------------

REVOKE ALL ON SCHEMA pgflow FROM public;
REVOKE ALL ON ALL TABLES IN SCHEMA pgflow FROM public;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgflow FROM public;
