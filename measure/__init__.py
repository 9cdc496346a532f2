"""What `bench` (`make bench`) and `loadtest` (`make loadtest`) share: one prompt set
(`measure.prompts`) and one way to count latencies (`measure.latency`: the percentiles both
report, how they are ranked, inter-token latency per token).

Imported from the repository root, as `bench` and `loadtest` are (not an installed package).
"""
