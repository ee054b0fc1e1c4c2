"""/aggregate: one request fanned out to upstream calls (on the loop) and DB queries (in the DB executor)."""
