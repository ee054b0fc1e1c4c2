"""A shared HTTP cache (RFC 9111) of upstream answers, single-flight coalescing of identical concurrent calls, and
stale-if-error, in front of one upstream's calls (hooked into app/upstream/client.py). Everything here runs on the
event loop.

    policy.py   what may be stored and for how long (Cache-Control, Expires, Age, Vary), request directives
    keys.py     the key of a call: upstream, method, URL, canonical query, every forwarded header
    entry.py    a stored answer, and its bytes in a shared backend
    memory.py   this process's store: bounded by bytes, least recently used out
    redis_store.py  the shared store: every replica reads what one stored; bounded in time, never failing a source
    flight.py   single flight: one upstream call for many identical waiters, none able to cancel it for the others
    layer.py    the order: lookup, coalesce, call, store; stale-if-error on failure
"""
