"""`make bench`: streaming performance of this server side by side with a naive server and the engine.

Its prompts and latency arithmetic (percentiles, per-token ITL) are shared with `loadtest`: `measure/`.
"""
