"""Each default of a run, named once: the job file's options, the command line, the runner's
settings, the pool's and the retry policy's all read them here (README, "A job file" and "Safe
defaults"). Seconds unless a name says otherwise."""

from __future__ import annotations

#: requests in flight at most (``options.concurrency``, ``--concurrency``)
CONCURRENCY = 16
#: the most ``concurrency`` may be
MAX_CONCURRENCY = 1024
#: how long one call may keep retrying (``options.retry_budget_seconds``)
RETRY_BUDGET_S = 600.0
#: retries may add at most this share of the run's requests (``options.retry_budget_percent``)
RETRY_BUDGET_PERCENT = 10.0
#: how long a target waits for its image's task lock (``options.lock_timeout_seconds``)
LOCK_TIMEOUT_S = 900.0
#: the run stops when this many targets in a row fail alike (``options.stop_after_failures``)
STOP_AFTER_FAILURES = 50
#: images per list page, also the API's maximum (``options.page_size``)
PAGE_SIZE = 1000
#: on SIGTERM, how long in-flight work may finish (``--grace-seconds``)
GRACE_S = 20.0
#: how old an unfinished run ``--resume`` may continue, in hours (``--resume-within``)
RESUME_WITHIN_HOURS = 24
#: how old a plan `run --plan` applies may be, in hours (`--plan-max-age`)
PLAN_MAX_AGE_HOURS = 24
#: where run folders live (``--state-dir``, env ``BULK_TAGGER_STATE_DIR``), from the working
#: folder; a report names ``--state-dir`` in the commands it prints only for another one
STATE_DIR = "runs"
#: how many demo images ``--simulate`` (and ``bulk-tagger simulate``) serves
SIMULATE_IMAGES = 60
#: the first retry's wait cap; caps double from here (``--retry-base-seconds``, for tests)
RETRY_BASE_S = 0.5
#: the longest wait between two attempts (``--retry-max-wait-seconds``, for tests)
RETRY_MAX_WAIT_S = 30.0
#: the first wait before a locked image's task is polled (``--lock-poll-seconds``, for tests)
LOCK_POLL_S = 1.0
#: where there is no terminal, a progress log line this often (``--progress-seconds``, for tests)
PROGRESS_S = 5.0
#: retention: finished runs older than this many days are pruned at the start of a run and by
#: ``bulk-tagger prune`` (``--keep-days``, env ``BULK_TAGGER_KEEP_DAYS``; 0 keeps every run)
KEEP_DAYS = 30.0
