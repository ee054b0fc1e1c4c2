"""CPU-bound transforms. Where each part runs:

- worker processes: ``worker`` (the process's main loop and one job), ``transforms`` (built-in functions);
- the gateway's event loop: ``pool`` (scheduling, admission, timeouts), ``staging`` and ``jsonarray`` (request
  bodies to checked arrays, in short slices), ``answers`` (answer format and size);
- the gateway's own threads: ``workers`` (one courier thread per worker process), ``reaper`` (unmapping);
- both sides: ``registry`` (what a transform declares), ``wire`` (messages), ``shm`` (segments), ``npyfmt``.
"""
