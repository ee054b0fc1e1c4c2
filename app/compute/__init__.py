"""CPU-bound transforms, the gateway's side (what runs in the worker processes is app/worker/). Where each part runs:

- the event loop: ``pool`` (the job lifecycle: admission, queue, dispatch, timeouts, records), ``fleet`` (the
  worker lifecycle: start, ready, exit, replacement, retirement), ``staging`` and ``jsonarray`` (request bodies to
  checked arrays, in short slices), ``answers`` (answer format and size), ``jsonwork`` (large upstream JSON);
- the gateway's own threads: ``couriers`` (one thread per worker process, blocking on its pipe), ``reaper``
  (unmapping large buffers);
- ``stats``: the records, counters and observer protocol metrics plug into.
"""
