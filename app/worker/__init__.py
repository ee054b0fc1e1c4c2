"""What runs in a CPU worker process, and nothing else: this package imports no gateway code that runs on the
event loop or in the gateway's threads (app/compute/ is that side).

- ``main``: the process's main function and one job; ``signals``: surviving the signals meant for the gateway;
- ``spec`` (re-exported here: the surface third-party transforms are written against), ``registry``,
  ``transforms`` (built-ins) and ``jsondigest`` (the gateway's internal JSON work);
- shared with the gateway side: ``wire`` (messages on the pipe), ``shm`` (segments), ``npyfmt`` (.npy headers).
"""

from app.worker.spec import NoParams, TransformInputError, TransformSpec

__all__ = ["NoParams", "TransformInputError", "TransformSpec"]
