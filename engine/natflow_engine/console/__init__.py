"""The natflow console: a web view of runs, workers and dead letters, live.

``natflow ui`` serves it (and ``natflow dev`` does too, on :data:`DEFAULT_PORT`). It reads
JetStream with the engine's own readers (the run index, history folds, the worker registry,
dead letters) and never imports the SDK. Modules:

* ``_app``: the ASGI app, shared state, access token and error pages;
* ``_views``: pages; ``_actions``: signal, cancel, terminate, start;
* ``_live``: server-sent events that patch live parts of a page;
* ``_reads``: reads from JetStream; ``_counts``: live run counts per status;
* ``_timeline``: the run page's bars; ``_format``: template filters;
* ``_serve``: running it under uvicorn; ``_cli``: the ``natflow ui`` command.
"""

from ._app import create_app
from ._serve import DEFAULT_HOST, DEFAULT_PORT, serve

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "create_app", "serve"]
