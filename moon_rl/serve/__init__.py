"""`moon-rl serve`: an HTTP embedding and search service over a `moon-rl embed` folder, with a search page.

Needs the `serve` extra (FastAPI, uvicorn, python-multipart): `pip install "moon-rl[serve]"`.

    app.py       routes, errors, API key, the page        service.py   index + catalogue + model
    batcher.py   concurrent requests -> one forward       inputs.py    request bodies, uploads, `dim`
    limits.py    the request body cap                     static/      the search page (HTML/JS/CSS)
"""

from __future__ import annotations

from moon_rl.serve.app import build_app, create_app

__all__ = ["build_app", "create_app"]
