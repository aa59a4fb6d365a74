"""bulk-tagger: change the tags and settings of very many Gcore Cloud VM images.

The flow runs one way (README, "How it is built"):
spec -> selectors -> plan -> pool -> journal -> report, with api under selectors and pool,
and cli on top wiring them together.
"""

__version__ = "0.1.0"
