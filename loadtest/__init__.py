"""Locust load tests over Triton's gRPC stream (`make loadtest`).

`locustfile.py` holds the users, `shape.py` the step-load shape; both are plain
locust files (`locust -f loadtest/locustfile.py[,loadtest/shape.py]`).
`run.py` starts a server, runs locust headless and prints the summary. The prompt
set and the latency arithmetic (percentiles, per-token ITL) are shared with `bench`: `measure/`.
"""
