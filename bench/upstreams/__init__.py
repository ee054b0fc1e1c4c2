"""Upstreams that cost almost nothing: nginx (zero latency) and a uvloop server with an exact, fixed latency."""

# The JSON every upstream answers: a small object, as a typical service's lookup returns.
BODY = b'{"id":42,"name":"widget","price":9.99,"tags":["a","b"],"stock":{"warehouse":"w1","units":17},"ok":true}'
