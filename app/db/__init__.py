"""Database access: blocking psycopg2 calls, run only in the bounded DB thread executor."""
