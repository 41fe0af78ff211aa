"""The console's pages (overview, camera, alarms, models, health) and the actions operators take.

Page handlers are plain functions: Starlette runs them in its thread pool, so Redis reads never
block the event loop that serves the live streams. Each reads what its page shows
(:mod:`dfm_stream.console.queries`) and renders a template. The actions (review an alarm, assign,
roll back a model, promote a camera's shadow candidate, roll a camera back) check CSRF and the
operator role first (:meth:`Console.must_act`), write through :mod:`dfm_stream.console.store`, the
model registry or :class:`~dfm_stream.promotion.Promotions` (in the thread pool too), record the
action in the audit stream, and redirect back. Assign, rollback, promote and camera rollback ask
for a confirmation first: the form posts once to show what will change, and again with
``confirm=yes`` to do it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response

from dfm_stream import keys
from dfm_stream.console import queries
from dfm_stream.console.store import audit, review_alarm, reviews
from dfm_stream.errors import ConsoleError, RegistryError
from dfm_stream.promotion import Promotions
from dfm_stream.registry import ModelRef, ModelRegistry
from dfm_stream.wire import REVIEW_TYPES

if TYPE_CHECKING:
    from starlette.requests import Request

CHART_SECONDS = 300
HISTORY_TYPES = ("raised", "cleared", "acknowledged", "false_alarm", "camera_down", "camera_up")
_TIME_FORMAT = "%Y-%m-%dT%H:%M"


def ns_time(ns: int | None) -> str:
    """Format Unix nanoseconds as UTC ``YYYY-MM-DD HH:MM:SS``."""
    return ms_time(None if ns is None else ns // 1_000_000)


def ms_time(ms: int | None) -> str:
    """Format Unix milliseconds as UTC ``YYYY-MM-DD HH:MM:SS``."""
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _parse_time(value: str | None) -> int | None:
    """Parse a ``YYYY-MM-DDTHH:MM`` (UTC) filter into Unix ms; None when empty or malformed."""
    if not value:
        return None
    try:
        return int(datetime.strptime(value[:16], _TIME_FORMAT).replace(tzinfo=UTC).timestamp() * 1000)
    except ValueError:
        return None


def _c(request: Request) -> Any:
    return request.app.state.console


def overview(request: Request) -> Response:
    """GET /: a tile per camera."""
    c = _c(request)
    if (redirect := c.must_view(request)) is not None:
        return redirect
    return c.render(
        request, "overview.html", cameras=c.live.snapshot["cameras"], error=c.live.snapshot["error"]
    )


def camera(request: Request) -> Response:
    """GET /camera/{camera}: live frame, last overlay, score chart, alarm history, settings, model."""
    c = _c(request)
    if (redirect := c.must_view(request)) is not None:
        return redirect
    cam = request.path_params["camera"]
    if not keys.valid_name(cam):
        return PlainTextResponse("bad camera id", status_code=404)
    desc = queries.registered_cameras(c.client, c.prefix).get(cam, {})
    state = queries.camera_state(c.client, c.prefix, cam, desc)
    history = queries.alarm_events(c.client, c.prefix, cam, types=HISTORY_TYPES, limit=50)
    last_raised = next((eid for eid, e in history if e.type == "raised" and e.image), None)
    start = int(time.time() * 1000) - CHART_SECONDS * 1000
    points = queries.scores_after(c.client, c.prefix, cam, str(start))
    assigned = ModelRegistry(c.client, c.prefix).assignments().get(cam)
    settings = {k: v for k, v in desc.items() if k not in ("pid", "session")}
    return c.render(
        request,
        "camera.html",
        camera=cam,
        state=state,
        settings=settings,
        assigned=str(assigned) if assigned else "",
        history=[queries.event_json(eid, e) for eid, e in history],
        last_raised=last_raised,
        points=points,
        chart_seconds=CHART_SECONDS,
        shadow=queries.shadow_view(c.client, c.prefix, cam),
    )


def camera_scores(request: Request) -> Response:
    """GET /camera/{camera}/scores?after=ID: the scores after a stream id, for the chart (JSON)."""
    c = _c(request)
    if c.must_view(request) is not None:
        return PlainTextResponse("log in first", status_code=401)
    cam = request.path_params["camera"]
    after = request.query_params.get("after") or str(int(time.time() * 1000) - CHART_SECONDS * 1000)
    if not keys.valid_name(cam) or not all(p.isdigit() for p in after.split("-", 1)):
        return PlainTextResponse("bad camera id or stream id", status_code=400)
    return JSONResponse(queries.scores_after(c.client, c.prefix, cam, after))


def alarms(request: Request) -> Response:
    """GET /alarms?camera=&since=&until=: the review queue, newest first."""
    c = _c(request)
    if (redirect := c.must_view(request)) is not None:
        return redirect
    q = request.query_params
    camera_filter = q.get("camera", "")
    if camera_filter and not keys.valid_name(camera_filter):
        camera_filter = ""
    since, until = _parse_time(q.get("since")), _parse_time(q.get("until"))
    rows = queries.alarm_events(c.client, c.prefix, camera_filter, since, until)
    found = reviews(c.client, c.prefix, [e.frame_id for _, e in rows if e.frame_id])
    items = [{**queries.event_json(eid, e), "review": found.get(e.frame_id or "")} for eid, e in rows]
    cams = sorted(set(queries.registered_cameras(c.client, c.prefix)) | {e.camera for _, e in rows})
    filters = {"camera": camera_filter, "since": q.get("since", ""), "until": q.get("until", "")}
    return c.render(request, "alarms.html", items=items, cameras=cams, filters=filters)


async def review(request: Request) -> Response:
    """POST /alarms/{alarm_id}/review: acknowledge or mark a false alarm (operators, CSRF-checked)."""
    c = _c(request)
    alarm_id = request.path_params["alarm_id"]
    checked = await c.must_act(request, "review")
    if isinstance(checked, Response):
        return checked
    return await run_in_threadpool(_review, request, checked[0], checked[1], alarm_id)


def _review(request: Request, user: Any, form: dict[str, Any], alarm_id: str) -> Response:
    c = _c(request)
    decision, comment = str(form.get("decision", "")), str(form.get("comment", ""))
    if decision not in REVIEW_TYPES:
        return PlainTextResponse(f"decision must be one of {', '.join(REVIEW_TYPES)}", status_code=400)
    try:
        result = review_alarm(c.client, c.prefix, alarm_id, decision, user.name, comment)
    except ConsoleError as e:
        audit(c.client, c.prefix, user.name, user.role, decision, alarm_id, str(e), ok=False)
        return PlainTextResponse(str(e), status_code=404)
    detail = f"camera {result['camera']}" + (f"; comment: {result['comment']}" if result["comment"] else "")
    audit(c.client, c.prefix, user.name, user.role, decision, alarm_id, detail)
    if request.headers.get("accept", "").startswith("application/json"):
        return JSONResponse(result)
    request.session["flash"] = f"Alarm {alarm_id} ({result['camera']}): {decision.replace('_', ' ')}."
    return RedirectResponse(_back(form, "/alarms"), status_code=303)


def _back(form: dict[str, Any], default: str) -> str:
    target = str(form.get("next") or default)
    return target if target.startswith("/") and not target.startswith("//") else default


def models(request: Request) -> Response:
    """GET /models: versions with metadata, current versions, camera assignments, assign/rollback forms."""
    c = _c(request)
    if (redirect := c.must_view(request)) is not None:
        return redirect
    view = queries.registry_view(c.client, c.prefix)
    cams = sorted(set(queries.registered_cameras(c.client, c.prefix)) | set(view["assignments"]))
    return c.render(request, "models.html", cameras=cams, **view)


async def assign(request: Request) -> Response:
    """POST /models/assign: route a camera to NAME or NAME@VERSION, after a confirmation step."""
    c = _c(request)
    checked = await c.must_act(request, "assign")
    if isinstance(checked, Response):
        return checked
    return await run_in_threadpool(_assign, request, checked[0], checked[1])


def _assign(request: Request, user: Any, form: dict[str, Any]) -> Response:
    c = _c(request)
    cam, ref_text = str(form.get("camera", "")).strip(), str(form.get("model", "")).strip()
    reg = ModelRegistry(c.client, c.prefix)
    try:
        ref = ModelRef.parse(ref_text)
        if form.get("confirm") != "yes":
            current = reg.assignments().get(cam)
            change = f"camera {cam}: {current or 'no model'} -> {ref}"
            fields = {"camera": cam, "model": str(ref)}
            return c.render(request, "confirm.html", action="/models/assign", change=change, fields=fields)
        reg.assign(cam, ref)
    except RegistryError as e:
        audit(c.client, c.prefix, user.name, user.role, "assign", cam, str(e), ok=False)
        request.session["flash"] = f"Not assigned: {e}"
        return RedirectResponse("/models", status_code=303)
    audit(c.client, c.prefix, user.name, user.role, "assign", cam, f"model {ref}")
    request.session["flash"] = f"Camera {cam} now runs {ref}."
    return RedirectResponse("/models", status_code=303)


async def rollback(request: Request) -> Response:
    """POST /models/rollback: make another version of a model current, after a confirmation step."""
    c = _c(request)
    checked = await c.must_act(request, "rollback")
    if isinstance(checked, Response):
        return checked
    return await run_in_threadpool(_rollback, request, checked[0], checked[1])


def _rollback(request: Request, user: Any, form: dict[str, Any]) -> Response:
    c = _c(request)
    name, version_text = str(form.get("name", "")).strip(), str(form.get("version", "")).strip()
    reg = ModelRegistry(c.client, c.prefix)
    try:
        version = int(version_text) if version_text else None
        if form.get("confirm") != "yes":
            target = version if version is not None else "the version before it"
            change = f"model {name}: current version {reg.current(name)} -> {target}"
            fields = {"name": name, "version": version_text}
            return c.render(request, "confirm.html", action="/models/rollback", change=change, fields=fields)
        done = reg.rollback(name, version)
    except (RegistryError, ValueError) as e:
        audit(c.client, c.prefix, user.name, user.role, "rollback", name, str(e), ok=False)
        request.session["flash"] = f"Not rolled back: {e}"
        return RedirectResponse("/models", status_code=303)
    audit(c.client, c.prefix, user.name, user.role, "rollback", name, f"current version {done}")
    request.session["flash"] = f"Model {name}: current version is now {done}."
    return RedirectResponse("/models", status_code=303)


async def promote(request: Request) -> Response:
    """POST /camera/{camera}/promote: make the camera's shadow candidate live, after a confirmation step."""
    c = _c(request)
    checked = await c.must_act(request, "promote")
    if isinstance(checked, Response):
        return checked
    return await run_in_threadpool(_switch, request, checked[0], checked[1], "promote")


async def camera_rollback(request: Request) -> Response:
    """POST /camera/{camera}/rollback: give the camera back its assignment before its last assign/promote."""
    c = _c(request)
    checked = await c.must_act(request, "rollback_camera")
    if isinstance(checked, Response):
        return checked
    return await run_in_threadpool(_switch, request, checked[0], checked[1], "rollback_camera")


def _switch(request: Request, user: Any, form: dict[str, Any], action: str) -> Response:
    """Promote (``model promote --camera``) or roll back (``model rollback --camera``) one camera."""
    c = _c(request)
    cam = request.path_params["camera"]
    if not keys.valid_name(cam):
        return PlainTextResponse("bad camera id", status_code=404)
    page = f"/camera/{cam}"
    verb = "promote" if action == "promote" else "rollback"
    promotions = Promotions(ModelRegistry(c.client, c.prefix))
    try:
        if form.get("confirm") != "yes":
            change, fields = _switch_change(promotions, cam, action)
            return c.render(
                request, "confirm.html", action=f"{page}/{verb}", change=change, fields=fields, cancel=page
            )
        if action == "promote":
            _check_candidate(promotions, cam, str(form.get("candidate", "")))
        done = promotions.promote(cam) if action == "promote" else promotions.rollback(cam)
    except RegistryError as e:
        audit(c.client, c.prefix, user.name, user.role, action, cam, str(e), ok=False)
        request.session["flash"] = f"Not {'promoted' if action == 'promote' else 'rolled back'}: {e}"
        return RedirectResponse(page, status_code=303)
    detail = f"model {done.after or 'unassigned'} (was {done.before or 'unassigned'})"
    audit(c.client, c.prefix, user.name, user.role, action, cam, detail)
    request.session["flash"] = (
        f"Camera {cam} now runs {done.after or 'no model'} (was {done.before or 'no model'})."
    )
    return RedirectResponse(page, status_code=303)


def _switch_change(promotions: Promotions, cam: str, action: str) -> tuple[str, dict[str, str]]:
    """Say what a promote or a camera rollback will change, and the fields the confirmation posts.

    RegistryError when there is nothing to do (no candidate; no earlier assignment recorded).
    """
    current = promotions.registry.assignments().get(cam)
    if action == "promote":
        candidate = promotions.shadow_of(cam)
        if candidate is None:
            raise RegistryError(f"camera {cam!r} has no shadow candidate to promote")
        change = (
            f"camera {cam}: {current or 'no model'} -> {candidate} (promote the candidate; shadowing stops)"
        )
        return change, {"candidate": str(candidate)}
    restored = promotions.registry.previous_assignment(cam) or "no model"
    return f"camera {cam}: {current or 'no model'} -> {restored} (its assignment before the last one)", {}


def _check_candidate(promotions: Promotions, cam: str, confirmed: str) -> None:
    """RegistryError when the candidate the operator confirmed is no longer the camera's candidate."""
    now = promotions.shadow_of(cam)
    if confirmed and now is not None and str(now) != confirmed:
        raise RegistryError(
            f"camera {cam!r}: the candidate is now {now}, not the {confirmed} you confirmed; look again"
        )


def health(request: Request) -> Response:
    """GET /health: workers and readers seen alive, stream lag per camera, dead letters."""
    c = _c(request)
    if (redirect := c.must_view(request)) is not None:
        return redirect
    described = queries.registered_cameras(c.client, c.prefix)
    cams = sorted(set(described) | {s["camera"] for s in c.live.snapshot["cameras"]})
    readers = [
        {"camera": cam, **{k: described[cam].get(k) for k in ("state", "host", "updated_ts", "fps", "model")}}
        for cam in sorted(described)
    ]
    return c.render(
        request,
        "health.html",
        workers=queries.workers(c.client, c.prefix),
        readers=readers,
        lags=[queries.stream_lag(c.client, c.prefix, cam) for cam in cams],
        dead=queries.dead_letters(c.client, c.prefix),
    )
