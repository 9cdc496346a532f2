"""Option defaults shared by the locust files and the runner (which must not import locust:
importing it monkey-patches the process)."""

THINK_TIME = "0.5,2"  # MIN,MAX seconds a user waits between two prompts
REQUEST_TIMEOUT_S = 60.0
PROMPT_SEED = 0
STEP_USERS = 4
STEP_TIME_S = 15.0
TTFT_P95_MS = 500.0
STEP_MAX_USERS = 256
