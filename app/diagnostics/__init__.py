"""Operator diagnostics: stacks, tasks, pool state, profiles and memory from a running gateway, and `doctor`."""
