"""The ``cax web`` application: routes, rendering, errors and the read-only guard.

Why Flask (with waitress as the server, ``cax.web.server``): the website needs routing, query
parsing, HTML templates with escaping on by default, and a server that survives the internet's
odd requests -- and none of it should be written here.  Flask is the smallest well-kept
framework that brings all of that (Werkzeug's HTTP handling, Jinja2's autoescaping), is
synchronous like pymongo and the embedded store, and pulls in only pure-Python packages of the
same maintainers.  An async framework (Starlette/FastAPI with uvicorn) would add an event loop
and threads to hide blocking database calls for no gain; Django brings an ORM and an admin we
would not use.  waitress is a pure-Python, multi-threaded production WSGI server that Flask's
own deployment guide names, with no compiler or C library needed at a site.

Nothing here writes: the runs DB is opened read-only (``open_runsdb(read_only=True)``: the
embedded store's file is opened read-only by SQLite, and RunsDB refuses every write), the only
methods routed are GET and HEAD, and no page has a form that changes anything.  Every value
that came from the runs DB reaches the page through Jinja2's autoescaping (or ``markupsafe``
in the SVG); the Content-Security-Policy forbids scripts outright, so even a mistake there
could not run one.  Each page is also JSON with ``?format=json``.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, render_template, request, url_for
from markupsafe import Markup
from werkzeug.exceptions import HTTPException

import cax
from cax.admin import status as st
from cax.clock import when
from cax.config import Config
from cax.errors import RunsDBError, UnsafeNameError
from cax.runsdb import RunsDB
from cax.runsdb.connect import redact
from cax.web import views
from cax.web.auth import Credentials, loopback_host
from cax.web.background import BackgroundView
from cax.web.svg import human_bytes, throughput_chart

log = logging.getLogger(__name__)

#: No script, font, frame or foreign resource of any kind; styles from this site only.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
#: The pages, in the order of the navigation bar: endpoint and title.
PAGES = (("matrix", "Runs"), ("daemons", "Daemons"), ("stuck", "Stuck"), ("tape", "Tape"),
         ("throughput", "Throughput"))
#: How the matrix shows each state: the symbols of ``cax status --summary``.
SYMBOLS = {state: symbol for state, (symbol, _) in st.SYMBOLS.items()}
CHECK_MARKS = {"recorded": "\u2713", "differs": "\u2717", "none": ""}
#: The tape report is recomputed when older than this; a page waiting for it reloads this often.
TAPE_MAX_AGE_S, TAPE_REFRESH_S = 60.0, 15


def create_app(config: Config, db: RunsDB, credentials: Credentials | None = None, *,
               slow_db: RunsDB | None = None, tape_wait_s: float = 0.8,
               loopback_only: bool = False) -> Flask:
    """The website over ``db`` (opened read-only by the caller), as site ``config.site``.

    ``slow_db``, a second read-only connection, serves the tape report, computed in the
    background (``cax.web.background``) so that it never holds up the other pages; a request
    waits ``tape_wait_s`` for a fresh one.  ``loopback_only`` (listening on loopback): a
    request must name this machine by a loopback name (``auth.loopback_host``).
    """
    app = Flask(__name__)
    tape_view = BackgroundView("tape report", lambda: views.tape_page(slow_db or db, config),
                               max_age_s=TAPE_MAX_AGE_S, wait_s=tape_wait_s)
    app.config.update(MAX_CONTENT_LENGTH=0, JSON_SORT_KEYS=False, TRAP_HTTP_EXCEPTIONS=False)
    app.jinja_env.autoescape = True  # every template, whatever its name
    app.jinja_env.filters.update(when=when, ago=st._ago, size=human_bytes)
    credentials = credentials or Credentials()
    runs_db_shown = redact(config.runs_db or "")

    def respond(template: str, value: Any, title: str, **extra: Any) -> Response:
        wanted = request.args.get("format", "html")
        if wanted == "json":
            return Response(views.to_json(value) + "\n", mimetype="application/json")
        if wanted != "html":
            raise views.PageError(400, f"format: {wanted[:20]!r} is not html or json")
        return Response(render_template(template, view=value, title=title, **extra),
                        mimetype="text/html")

    @app.context_processor
    def common() -> dict[str, Any]:
        args = {**(request.view_args or {}), **request.args.to_dict(), "format": "json"}
        return {"pages": PAGES, "version": cax.__version__, "site": config.site.name,
                "runs_db": runs_db_shown, "symbols": SYMBOLS, "check_marks": CHECK_MARKS,
                "json_url": url_for(request.endpoint, **args) if request.endpoint else None}

    @app.before_request
    def authenticate() -> Response | None:
        if loopback_only and not loopback_host(request.host):
            return Response("this website answers to a loopback name only (localhost, "
                            "127.0.0.1)\n", 400, mimetype="text/plain")
        if credentials.allows(request.headers.get("Authorization")):
            return None
        return Response("authentication required\n", 401, mimetype="text/plain",
                        headers={"WWW-Authenticate": 'Basic realm="cax", charset="UTF-8"'})

    @app.after_request
    def secure(response: Response) -> Response:
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.get("/")
    def matrix() -> Response:
        flt = views.MatrixFilter.parse(request.args)
        older = views.parse_cursor(request.args.get("older"))
        per_page = views.int_param(request.args, "per_page", views.PER_PAGE, 1, views.MAX_PER_PAGE)
        value = views.matrix(db, config, flt, older, per_page)
        return respond("matrix.html", value, "Runs", statuses=(*views.STATUSES, views.NO_ENTRY),
                       first_page=older is None)

    @app.get("/run/<int:number>")
    def run(number: int) -> Response:
        return respond("run.html", views.run_page(db, config, number), f"Run {number}")

    @app.get("/daemons")
    def daemons() -> Response:
        value = views.daemons_page(db, config)
        shown = [d for d in value["daemons"] if d["state"] in ("alive", "late")
                 or (d["age_s"] is not None and d["age_s"] < st.FORGET_AFTER_S)]
        return respond("daemons.html", value, "Daemons", shown=shown,
                       hidden=len(value["daemons"]) - len(shown))

    @app.get("/stuck")
    def stuck() -> Response:
        site = request.args.get("site") or None
        return respond("stuck.html", views.stuck_page(db, config, site), "Stuck",
                       chosen=site, sites=[s.name for s in config.sites])

    @app.get("/tape")
    def tape() -> Response:
        snap = tape_view.get()
        if snap.value is None:
            if snap.error is not None:
                raise RunsDBError(snap.error)
            response = error(503, "the tape report is being computed: it reads every tape "
                                  "copy, which takes a while in a large runs DB; this page "
                                  "reloads itself", refresh=TAPE_REFRESH_S)
            response.headers["Retry-After"] = str(TAPE_REFRESH_S)
            return response
        return respond("tape.html", {**snap.value, "as_of": snap.taken}, "Tape",
                       computing=snap.computing, failed=snap.error)

    @app.get("/throughput")
    def throughput() -> Response:
        value = views.throughput(db)
        return respond("throughput.html", value, "Throughput",
                       chart=throughput_chart(value) if request.args.get("format") != "json"
                       else Markup(""),
                       totals={s: sum(value["bytes"][s]) for s in value["sites"]})

    def error(status: int, message: str, refresh: int | None = None) -> Response:
        if request.args.get("format") == "json":
            return Response(views.to_json({"error": message, "status": status}) + "\n",
                            status, mimetype="application/json")
        return Response(render_template("error.html", status=status, message=message,
                                        title=f"Error {status}", refresh=refresh),
                        status, mimetype="text/html")

    @app.errorhandler(views.PageError)
    def page_error(exc: views.PageError) -> Response:
        return error(exc.status, exc.message)

    @app.errorhandler(UnsafeNameError)
    def unsafe_name(exc: UnsafeNameError) -> Response:
        return error(400, str(exc))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        response = error(exc.code or 500, exc.description or exc.name)
        if exc.code == 405:
            response.headers["Allow"] = "GET, HEAD"
        return response

    @app.errorhandler(RunsDBError)
    def runs_db_error(exc: RunsDBError) -> Response:
        log.warning("runs DB: %s", exc)
        return error(503, f"the runs DB did not answer: {redact(str(exc))}")

    @app.errorhandler(Exception)
    def internal(exc: Exception) -> Response:
        log.exception("cax web: internal error on %s", request.path)
        return error(500, "internal error (details in the server's log)")

    return app
