"""The chat page at `/`: plain files shipped in the package (index.html, app.js, markdown.js, style.css; no build
step, nothing loaded from anywhere else), read once when the app is made and served without the API key. The page
holds no secret: it asks for the key when a /v1 call answers 401, keeps it in the browser's localStorage and
sends it on its /v1 calls. It reads the server's figures from the open `GET /metrics`.

`ServerConfig.web_ui` (`--no-web-ui`) leaves these routes out, so `/` is then the usual 404 error object.
"""

from __future__ import annotations

from importlib import resources

from quart import Quart, Response
from werkzeug.exceptions import NotFound

ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
"""The files under `/static/`, with their content types; any other name is a 404."""

_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
# The page runs only its own scripts and talks only to this server: model output rendered into it cannot load
# or run anything even if the renderer let markup through.
_PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def add_routes(app: Quart) -> None:
    """`GET /` (the page) and `GET /static/<name>` (its scripts and style)."""
    files = resources.files(__name__)
    page = files.joinpath("index.html").read_bytes()
    assets = {name: (files.joinpath(name).read_bytes(), kind) for name, kind in ASSETS.items()}

    @app.get("/")
    async def chat_page() -> Response:
        return Response(page, content_type="text/html; charset=utf-8",
                        headers={**_HEADERS, "Content-Security-Policy": _PAGE_POLICY})

    @app.get("/static/<name>")
    async def chat_page_asset(name: str) -> Response:
        if name not in assets:
            raise NotFound()
        body, kind = assets[name]
        return Response(body, content_type=kind, headers=_HEADERS)
