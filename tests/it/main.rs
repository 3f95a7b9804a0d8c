//! Integration tests: one binary, each test in its own database on a real PostgreSQL server
//! (`DATABASE_URL`, or a throwaway server started for this process).

mod install;
