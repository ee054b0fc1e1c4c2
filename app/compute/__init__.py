"""CPU-bound work: runs only in worker processes of the process pool, never on the event loop."""
