"""The local HTTP API: ``app`` (routes), ``infer`` (the one inference path), ``asgi`` (bodies, responses, errors), ``metadata``, ``metrics``."""
