"""The web console: one static page (``GET /``) and the small JSON API it polls.

No build step and nothing fetched from outside: ``static/`` holds the HTML, a vanilla JS
file and a stylesheet, served by the same ASGI app as the OpenAI front. The page talks to
``/v1/chat/completions`` (streamed) for chat and to ``/console/api/*`` (``routes``) for the
models of the supervisor and the model-operation jobs (``jobs``).
"""

from inferd.http.console.routes import api_router, page_router

__all__ = ["api_router", "page_router"]
