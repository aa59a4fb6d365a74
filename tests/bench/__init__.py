"""The benchmark harness of issue 8 (``make bench``): bulk-tagger side by side with a bare
aiohttp floor and the official SDK, each in its own process against a fresh simulator
process. See ``tests/bench/README.md``; run ``python -m tests.bench --help``."""
