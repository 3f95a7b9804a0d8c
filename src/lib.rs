//! pgflow: a DAG workflow engine that runs inside PostgreSQL.
