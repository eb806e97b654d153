"""`max benchmark`: serving latency and throughput of any OpenAI-compatible server, measured as a client sees it.

A package rather than one file because the command grew four concerns that change for different reasons, each
readable on its own:

- `workload.py`: what is sent (the built-in prompts, random prompts of a given length, a ShareGPT file);
- `load.py`: how it is sent and timed (closed-loop workers over streaming HTTP, one concurrency level at a time);
- `report.py`: what is made of the timings (percentiles, the table, the plot, the JSON);
- `command.py`: the click command that ties them together, and the progress shown while it runs.

Only `command.py` is imported by `max --help`, and it imports nothing beyond click at module level.
"""
