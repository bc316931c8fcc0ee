"""The web app: a browsable, labelled, steerable atlas of one run (a leaf: nothing imports it).

    from saescope.server import create_app, serve
    serve("runs/gemma-3-270m")                  # http://127.0.0.1:8000/
"""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
