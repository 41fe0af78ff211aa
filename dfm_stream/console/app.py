"""The console's web application: middleware, login, the live event stream, pictures, and the pages.

Built with Starlette and served by uvicorn (``dfm-stream console``). Page handlers and the actions
operators take are in :mod:`dfm_stream.console.pages`; this module wires them up with what every
request needs: the signed session cookie, the user and role, CSRF checks, security headers.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from dfm_stream import keys
from dfm_stream.console import pages, queries
from dfm_stream.console.auth import CSRF_FIELD, User, Users, csrf_ok, csrf_token, session_user
from dfm_stream.console.live import Live
from dfm_stream.console.store import audit

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.requests import Request
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from dfm_stream.connect import RedisClient

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
SESSION_COOKIE = "dfm_console"
SECURITY_HEADERS = {
    b"content-security-policy": (
        b"default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self';"
        b" frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"same-origin",
}


@dataclass
class Console:
    """What the handlers share: Redis, the key prefix, the users, the live poller, the templates."""

    client: RedisClient
    prefix: str
    users: Users
    live: Live
    templates: Jinja2Templates

    def user(self, request: Request) -> User:
        """Return the user of the request's session (anonymous when not logged in)."""
        return session_user(request.session, self.users)

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        """Render a page with what every page shows: the user, the CSRF token, read-only mode."""
        flash = request.session.pop("flash", None)
        base = {
            "user": self.user(request),
            "csrf": csrf_token(request.session),
            "csrf_field": CSRF_FIELD,
            "auth_enabled": self.users.enabled,
            "flash": flash,
        }
        return self.templates.TemplateResponse(request, name, {**base, **context}, status_code=status)

    def must_view(self, request: Request) -> Response | None:
        """Return a redirect to the login page when users are configured and nobody is logged in."""
        if self.users.enabled and not self.user(request).logged_in:
            return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
        return None

    async def must_act(self, request: Request, action: str) -> tuple[User, dict[str, Any]] | Response:
        """Check CSRF and the operator role of a state-changing request; return the user and form, or 403."""
        form = dict(await request.form())
        submitted = form.get(CSRF_FIELD) or request.headers.get("x-csrf-token")
        user = self.user(request)
        if not csrf_ok(request.session, submitted if isinstance(submitted, str) else None):
            audit(
                self.client,
                self.prefix,
                user.name or "-",
                user.role,
                action,
                detail="refused: bad CSRF",
                ok=False,
            )
            return PlainTextResponse("forbidden: missing or wrong CSRF token", status_code=403)
        if not user.can_act:
            why = "the console is read only (no users file)" if not self.users.enabled else "operators only"
            audit(
                self.client,
                self.prefix,
                user.name or "-",
                user.role,
                action,
                detail=f"refused: {why}",
                ok=False,
            )
            return PlainTextResponse(f"forbidden: {why}", status_code=403)
        return user, form


class SecurityHeaders:
    """Pure ASGI middleware adding CSP and friends to every response (streaming ones included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; add the headers to the response start."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS.items()]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _console(request: Request) -> Console:
    return request.app.state.console


async def login_page(request: Request) -> Response:
    """GET /login: the login form (or a note that the console is read only)."""
    return _console(request).render(request, "login.html", next=_safe_next(request.query_params.get("next")))


async def login(request: Request) -> Response:
    """POST /login: check CSRF, the user name and password; start the session."""
    c = _console(request)
    form = dict(await request.form())
    if not csrf_ok(request.session, str(form.get(CSRF_FIELD) or "")):
        return PlainTextResponse("forbidden: missing or wrong CSRF token", status_code=403)
    name, password = str(form.get("username", "")), str(form.get("password", ""))
    user = await run_in_threadpool(c.users.check, name, password) if c.users.enabled else None
    if user is None:
        audit(
            c.client, c.prefix, name[:64] or "-", "-", "login", detail="wrong user name or password", ok=False
        )
        return c.render(request, "login.html", status=401, error="Wrong user name or password.", next="/")
    request.session.clear()
    request.session["user"] = user.name
    csrf_token(request.session)  # a fresh token for the new session
    audit(c.client, c.prefix, user.name, user.role, "login")
    return RedirectResponse(_safe_next(str(form.get("next") or "/")), status_code=303)


async def logout(request: Request) -> Response:
    """POST /logout: end the session (CSRF-checked like every state change)."""
    c = _console(request)
    if not csrf_ok(request.session, str((await request.form()).get(CSRF_FIELD) or "")):
        return PlainTextResponse("forbidden: missing or wrong CSRF token", status_code=403)
    user = c.user(request)
    if user.logged_in:
        audit(c.client, c.prefix, user.name, user.role, "logout")
    request.session.clear()
    return RedirectResponse("/login" if c.users.enabled else "/", status_code=303)


def _safe_next(target: str | None) -> str:
    """Return a local path to go to after login (never another site)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


async def events(request: Request) -> Response:
    """GET /events: the Server-Sent Events stream of the line (snapshots and alarm events)."""
    c = _console(request)
    if c.users.enabled and not c.user(request).logged_in:
        return PlainTextResponse("log in first", status_code=401)
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(
        c.live.stream(request.is_disconnected), media_type="text/event-stream", headers=headers
    )


def _jpeg(data: bytes | None) -> Response:
    if data is None:
        return PlainTextResponse("no picture", status_code=404)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


def frame(request: Request) -> Response:
    """GET /frame/{camera}.jpg: the camera's latest frame."""
    c = _console(request)
    camera = request.path_params["camera"]
    if c.must_view(request) is not None:
        return PlainTextResponse("log in first", status_code=401)
    if not keys.valid_name(camera):
        return PlainTextResponse("bad camera id", status_code=404)
    return _jpeg(c.live.frame(camera))


def alarm_image(request: Request) -> Response:
    """GET /alarm-image/{alarm_id}.jpg: the overlay picture of a raised alarm."""
    c = _console(request)
    if c.must_view(request) is not None:
        return PlainTextResponse("log in first", status_code=401)
    event = queries.event_at(c.client, c.prefix, request.path_params["alarm_id"])
    return _jpeg(event.image if event is not None else None)


async def healthz(request: Request) -> Response:
    """GET /healthz (and /readyz): the console process answers."""
    return PlainTextResponse("ok")


def build_app(
    client: RedisClient, prefix: str, users: Users, secret: str, https_only: bool = False
) -> Starlette:
    """Return the console application (the poller thread runs while the app is served)."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["ns_time"] = pages.ns_time
    templates.env.filters["ms_time"] = pages.ms_time
    live = Live(client, prefix)
    console = Console(client, prefix, users, live, templates)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        live.start()
        try:
            yield
        finally:
            live.stop()

    routes = [
        Route("/", pages.overview),
        Route("/camera/{camera}", pages.camera),
        Route("/camera/{camera}/scores", pages.camera_scores),
        Route("/camera/{camera}/promote", pages.promote, methods=["POST"]),
        Route("/camera/{camera}/rollback", pages.camera_rollback, methods=["POST"]),
        Route("/alarms", pages.alarms),
        Route("/alarms/{alarm_id}/review", pages.review, methods=["POST"]),
        Route("/models", pages.models),
        Route("/models/assign", pages.assign, methods=["POST"]),
        Route("/models/rollback", pages.rollback, methods=["POST"]),
        Route("/health", pages.health),
        Route("/login", login_page),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/events", events),
        Route("/frame/{camera}.jpg", frame),
        Route("/alarm-image/{alarm_id}.jpg", alarm_image),
        Route("/healthz", healthz),
        Route("/readyz", healthz),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    middleware = [
        Middleware(SecurityHeaders),
        Middleware(
            SessionMiddleware,
            secret_key=secret,
            session_cookie=SESSION_COOKIE,
            same_site="strict",
            https_only=https_only,
            max_age=12 * 3600,
        ),
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.console = console
    return app
