"""The OpenAI-compatible server's parts (`dyvte-serve`, `python serve.py`; docs/serving.md), one rule per place:

- `requests`: what a request may hold, checked field by field in the HTTP process before it is queued (a 400 or 413
  naming the field and the limit);
- `answers`: what a request's answer is while it is generated (one rule for the streamed and the whole text, stop
  strings, per-request sampling seeds) and how a batch is split into generate calls by prompt length;
- `http`: the HTTP process (LitServe's OpenAI spec with dyvte's checks, stats that count every request in exactly one
  outcome, body size and read timeouts);
- `worker`: the model worker (LitServe's `LitAPI`: a batch of checked requests, generated per prompt-length group,
  where an error fails only the request it belongs to).
"""

from dyvte.extras import check_installed

check_installed("litserve", "serve", "dyvte-serve (python serve.py)")  # before the imports of the modules fail unnamed
