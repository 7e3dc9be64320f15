"""The studio's web server: a login page, the Gradio pages (new campaign, campaigns), and the routes
that hand a user their own files (thumbnails, videos, all videos as a zip) from the store. Every
route and every page event finds the user from the signed session cookie, and asks the `Studio`
for that user's campaigns only; nothing is served from Gradio's cache or from the store by path."""

from __future__ import annotations

import asyncio
import html
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

import gradio as gr
from fastapi import FastAPI, Form, Request
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from gradio.utils import get_upload_folder as gradio_upload_folder
from starlette.concurrency import run_in_threadpool

from heygem_ray import storage
from heygem_ray.studio.cluster import ClusterUnavailable
from heygem_ray.studio.service import (
    QUALITIES,
    UPLOAD_WINDOW_SECONDS,
    CampaignView,
    StoreFailed,
    Studio,
    SubmitUnconfirmed,
    distinct_uploads,
)
from heygem_ray.studio.sessions import COOKIE, DEVICE_COOKIE, DEVICE_LIFETIME, LIFETIME, PageOwners, Sessions
from heygem_ray.studio.store import (
    AUDIO_TYPES,
    AVATAR_TYPES,
    CAMPAIGN_ID,
    MANIFEST_TYPES,
    UploadError,
    read_uploaded_manifest,
    repeated_name,
    repeated_names,
    resolve_uploads,
)
from heygem_ray.studio.users import LoginGuard, UsersFile, loopback_peer_uid

#: the one user of a studio without a users file (it listens on 127.0.0.1 only)
LOCAL_USER = "local"
UI_PATH = "/app"
API_PATH = UI_PATH + "/gradio_api/"
#: page events waiting for a slot, all users together
EVENT_QUEUE_SIZE = 256
#: threads running page events, all users together: at least their groups' limits (`build_pages`)
EVENT_THREADS = 64
#: page events of one user waiting or running, all their pages together: one user's script filled
#: the whole queue, and every other user's pages were refused ("queue full")
USER_EVENTS = 64  # a quarter of the queue: a page has a handful of events at most, a user a dozen pages
#: Gradio's routes for files: `file=<path in its cache>` or `file/<path>`, or a URL it fetches
FILE_ROUTES = (API_PATH + "file=", API_PATH + "file/")
UPLOAD_PATH = API_PATH + "upload"
#: Gradio's routes the studio has no use for: a microphone recording's processing takes a file of
#: any size into the upload cache past the quota's check of uploads; a deep link copies a page's
#: state (its session's) into a link for anyone; component servers and media streams (no component
#: of the studio's has them) take a session hash the studio does not check, and so do the `call`
#: routes (an event id or, failing that, a session hash in their path: pages and gradio_client use
#: the queue's routes); its startup events, which a mounted app never marks run (a caller re-ran
#: them: a second queue loop, its running jobs' record reset), and its development mode's reload
#: stream (a poll every 50 ms for each connection)
NOT_SERVED = (
    API_PATH + "process_recording",
    API_PATH + "deep_link",
    API_PATH + "component_server",
    API_PATH + "startup-events",
    API_PATH + "dev/reload",
)
NOT_SERVED_UNDER = (API_PATH + "stream/", API_PATH + "call/")
#: what a page's session hash may be (Gradio's script makes base-36 ones, gradio_client UUIDs):
#: anything else is not remembered (a MiB-long one per request would be, for a day)
PAGE = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Gradio's route that names a page (its session hash) in its path
HEARTBEAT = API_PATH + "heartbeat/"
#: the largest page event the studio takes (its text fields and file references: files are uploaded)
EVENT_MAX_BYTES = 2**20
#: the largest body of any other request (the sign-in form's fields): the form is parsed whole, up
#: to a GB in 1000 fields or a file part of any size, before its fields' limits are checked
FORM_MAX_BYTES = 8192
_CHUNK = 2**20
#: on every page: an event the server refuses for want of a session (signed out on another page,
#: past its lifetime, the user removed) takes the page to the sign-in form; Gradio itself would show
#: an error on each refresh, every 3 s, on a page that no longer works
SESSION_ENDED_JS = (
    "<script>(() => { const send = window.fetch.bind(window); let gone = false;"
    " window.fetch = async (...args) => { const answer = await send(...args);"
    f" if (answer.status === 401 && !gone && new URL(answer.url, location.href).pathname.startsWith({json.dumps(API_PATH)}))"
    " { gone = true; location.replace('/login?ended=1'); } return answer; }; })();</script>"
)
#: the open campaign is kept in the page's address (`?campaign=<id>`): a refresh reopens it
FROM_ADDRESS = "(c) => new URLSearchParams(location.search).get('campaign') || c || null"
TO_ADDRESS = (
    "(c) => { const u = new URL(location.href); if (c) u.searchParams.set('campaign', c);"
    " else u.searchParams.delete('campaign'); history.replaceState(history.state, '', u); }"
)
#: after a submit the cluster took but did not answer: what to do (the campaign keeps the job's id)
UNCONFIRMED = "The Campaigns tab shows whether it runs once the cluster answers; re-run it there if it does not."
NOT_SUBMITTED = "It is open on the Campaigns tab: re-run it there once the cluster answers."


def build_app(studio: Studio, users_file: str | None, sessions: Sessions) -> FastAPI:
    app = FastAPI(title="heygem_ray studio")
    log = studio.log
    users = UsersFile(users_file) if users_file else None
    guard = LoginGuard()
    # uploads leave the cache when a campaign is made; what is left (uploads never submitted) goes
    # after 15 minutes, swept by the server (`server.sweep_uploads`) every minute, not by Gradio's
    # delete_cache: each sweep would leave listed what the other removed, and its lists would grow
    claims = app.state.upload_claims = UploadClaims(UPLOAD_WINDOW_SECONDS)
    pages = PageOwners()

    def current_user(request: Request) -> str | None:
        if users is None:
            return LOCAL_USER
        return sessions.user(request.cookies.get(COOKIE), users.hashes())

    @app.middleware("http")
    async def same_origin_and_login_first(request: Request, call_next):
        """Requests another site's page makes (its Origin is not this server) are refused: no
        other origin may act or read as the signed-in user. The pages send a visitor without a
        session to the login page (Gradio's own answer would be a bare 401). A studio without
        users serves the account that started it alone: every account on the host reaches
        127.0.0.1."""
        if "transfer-encoding" in request.headers:
            # its body is read as chunks come, however many; a Content-Length beside it, which every
            # size and quota check here reads, says nothing (uvicorn's h11 takes both)
            return Response("a request must say its length", status_code=411, headers={"Connection": "close"})
        if users is None and not await run_in_threadpool(_from_this_account, request):
            return Response("this studio has no users: it serves the account that started it only", status_code=403)
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host", ""):
            return Response("cross-origin request refused", status_code=403)
        if request.url.path.rstrip("/") == UI_PATH and request.method == "GET" and current_user(request) is None:
            # a campaign's link (mail, chat: the cookie is not sent from another site) opens it
            # once signed in; its id alone is carried, never a URL to go to
            return RedirectResponse("/login" + _campaign_query(request.query_params.get("campaign")), status_code=303)
        # Gradio's GET routes (its heartbeat's endless stream, its file routes) ask for no sign-in
        if request.url.path.startswith(API_PATH) and request.method not in ("POST", "PUT", "PATCH"):
            user = await run_in_threadpool(current_user, request)
            if user is None:
                return Response("sign in first", status_code=401)
            # each page it names: Gradio's heartbeat takes its path's, a "session_hash" beside it was checked instead
            hashes = (request.query_params.get("session_hash"), _after(request.url.path, HEARTBEAT))
            if any(page and not (PAGE.fullmatch(page) and pages.allows(page, user)) for page in hashes):
                return Response("not your page", status_code=403)
        if request.url.path.rstrip("/") in NOT_SERVED or request.url.path.startswith(NOT_SERVED_UNDER):
            return Response(status_code=404)
        named = _file_named(request.scope.get("path", request.url.path))  # as sent: "#" in a name kept
        if named is not None and _in_uploads(named):
            user = await run_in_threadpool(current_user, request)
            if not claims.uploaded_by(user or "", named):
                return Response(status_code=404)  # another user's upload, its link leaked from their page
        if _names_a_url(request.url.path):
            # Gradio would fetch any public URL named there and pass it on: no proxy for anyone
            return Response("files are served from this server only", status_code=403)
        if request.method == "POST" and request.url.path == UPLOAD_PATH:
            refused = await run_in_threadpool(_upload_refused, request)
            if refused is not None:
                return refused
        elif request.method in ("POST", "PUT", "PATCH"):
            length = _length(request)
            if length is None:  # a chunked body would be read whole before anyone is asked for a login
                return Response("a request must say its length", status_code=411)
            # files come by upload; elsewhere a sign-in form, read before any login is checked
            if length > (EVENT_MAX_BYTES if request.url.path.startswith(API_PATH) else FORM_MAX_BYTES):
                return Response("too large", status_code=413)
            if request.url.path.startswith(API_PATH):
                # a stranger's MiB of JSON is not read, let alone walked; the walk runs off the
                # event loop, which every request waits on
                user = await run_in_threadpool(current_user, request)
                if user is None:
                    return Response("sign in first", status_code=401)
                event = await run_in_threadpool(_json_or_none, await request.body())
                refused = await run_in_threadpool(_linked_files_refused, event)
                if refused is not None:
                    return refused
                page = event.get("session_hash") if isinstance(event, dict) else None
                if page is not None and not (
                    isinstance(page, str) and PAGE.fullmatch(page) and pages.allows(page, user)
                ):
                    return Response("not your page", status_code=403)
                if request.url.path == API_PATH + "queue/join" and _events_of(user) >= USER_EVENTS:
                    return Response("too many of your events wait: let them finish first", status_code=429)
                if request.url.path == API_PATH + "cancel" and _elsewhere(event, page):
                    # Gradio removes the event named from its queue whatever page it is of
                    return Response("not your page's event", status_code=403)
        booked = getattr(request.state, "upload_booked", None)  # (user, size) `_upload_refused` let in
        try:
            response = await call_next(request)
        except BaseException:
            if booked is not None:
                studio.upload_ended(*booked)
            raise
        if booked is not None and response.status_code != 200:
            studio.upload_ended(*booked)
        if request.method == "POST" and request.url.path == UPLOAD_PATH and response.status_code == 200:
            # its bytes are in (the route reads them all before it answers): counted from now, as
            # long as the web server keeps it; counted from its start, a slow upload left the quota
            # while its file stayed. Its files are its user's from now, before any page event says
            # so (another user's campaign made meanwhile must not remove them: `UploadClaims`)
            body = b"".join([chunk async for chunk in response.body_iterator])
            answered, response = response, Response(body, status_code=200)
            response.raw_headers = answered.raw_headers  # each as it was (a dict keeps one of repeated ones)
            user, size = current_user(request), _length(request)
            if user is not None and size is not None:
                paths = _upload_answer(body)
                claims.arrived(user, paths)
                studio.upload_arrived(user, size, paths)
        if request.url.path.startswith(("/files/", API_PATH)):
            # a user's own (videos, pending uploads by Gradio's file routes, events): no shared cache
            # (a CDN keeps .mp4 and .jpg whatever the cookies) may keep them for anyone with the link
            response.headers["Cache-Control"] = "private, no-store"
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Content-Security-Policy", "frame-ancestors 'self'")
        return response

    def _live_events() -> dict[str, Any]:
        """Gradio's page events now, waiting or running, by id (it forgets each as it ends; its
        record by page keeps those whose page closed while they ran, for good)."""
        try:
            return dict(blocks._queue.event_ids_to_events)
        except AttributeError:  # Gradio's internals moved: no check, as before it
            return {}

    def _events_of(user: str) -> int:
        """Page events of `user`'s pages waiting or running."""
        return sum(pages.owner(getattr(e, "session_hash", "")) == user for e in _live_events().values())

    def _elsewhere(event: object, page: str | None) -> bool:
        """Whether the event a cancel names waits or runs for another page than `page`."""
        named = event.get("event_id") if isinstance(event, dict) else None
        held = _live_events().get(named) if isinstance(named, str) else None
        return held is not None and getattr(held, "session_hash", None) != page

    def _upload_refused(request: Request) -> Response | None:
        """An upload the user's quota has no room for, refused before its bytes are taken."""
        user = current_user(request)
        if user is None:
            return None  # Gradio refuses it
        size = _length(request)
        # "Connection: close": else the server reads (and drops) the whole refused body before the
        # browser, still sending it, sees the answer
        if size is None:
            return Response("an upload must say its length", status_code=411, headers={"Connection": "close"})
        why = studio.admit_upload(user, size)
        if why is not None:
            return Response(why, status_code=413, headers={"Connection": "close"})
        request.state.upload_booked = (user, size)
        return None

    if users is None:  # one local user: only loopback names reach it (no DNS rebinding to 127.0.0.1)
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "::1", "[::1]"])

    @app.get("/")
    def home() -> RedirectResponse:
        return RedirectResponse(UI_PATH + "/", status_code=303)

    @app.get("/health")
    def health() -> JSONResponse:
        """Answered to anyone (probes have no login): the cluster's address and error are for the
        signed-in page and the log only."""
        return JSONResponse({"status": "ok", "cluster": "unreachable" if studio.cluster.problem() else "ok"})

    @app.get("/login")
    def login_page(ended: bool = False, campaign: str = "") -> Response:
        if users is None:
            return RedirectResponse(UI_PATH + "/" + _campaign_query(campaign), status_code=303)
        return HTMLResponse(_login_html("Your session ended: please sign in again." if ended else "", campaign))

    @app.post("/login")
    def login(
        request: Request,
        name: str = Form(..., max_length=64),
        password: str = Form(..., max_length=1024),
        campaign: str = Form("", max_length=64),
    ) -> Response:
        opened = UI_PATH + "/" + _campaign_query(campaign)
        if users is None:
            return RedirectResponse(opened, status_code=303)
        keys = guard.keys(name, request.client.host if request.client else "")
        counted = keys
        device = request.cookies.get(DEVICE_COOKIE)
        if sessions.known_device(device, name, users.hashes()):
            # a browser the user signed in from counts its own failures only: not others' as them,
            # nor its address's (an office behind one address, a guesser among them)
            counted = (("known browser", name),)  # its user's browsers together: a cookie names no one browser
            # a right password clears the name's failures and its own, not a share of its address's
            # (which it did not add to): else a guesser with an account alternates guesses and sign-ins
            keys = (*(key for key in keys if key[0] != "client"), *counted)
        wait = guard.begin(*counted)
        if wait > 0:
            log.info("login refused user=%r (too many tries)", name)
            return HTMLResponse(_login_html(f"Too many tries: wait {wait:.0f} s.", campaign), status_code=429)
        if not guard.check(users, name, password, *keys):  # a right one clears the name's failures too
            log.info("login refused user=%r", name)
            return HTMLResponse(_login_html("Wrong name or password.", campaign), status_code=401)
        log.info("login user=%s", name)
        response = RedirectResponse(opened, status_code=303)
        secure = request.url.scheme == "https"
        cookie = sessions.issue(name, users.hashes()[name])
        response.set_cookie(COOKIE, cookie, max_age=LIFETIME, httponly=True, samesite="strict", secure=secure)
        device = sessions.device(name, users.hashes()[name])
        response.set_cookie(
            DEVICE_COOKIE, device, max_age=DEVICE_LIFETIME, httponly=True, samesite="strict", secure=secure
        )
        return response

    @app.get("/logout")
    def logout(request: Request) -> Response:
        if users is not None:  # ended on the server too: a copy of the cookie is refused from now on
            user = sessions.end(request.cookies.get(COOKIE), users.hashes())
            if user is not None:
                log.info("logout user=%s", user)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @app.get("/files/{campaign_id}/all.zip")
    def download_all(campaign_id: str, request: Request) -> Response:
        user = current_user(request)
        archive = studio.zip(user, campaign_id) if user else None
        if archive is None:
            return Response(status_code=404)
        length, chunks = archive
        headers = {"Content-Disposition": f'attachment; filename="{campaign_id}.zip"', "Content-Length": str(length)}
        return StreamingResponse(chunks, media_type="application/zip", headers=headers)

    @app.get("/files/{campaign_id}/video/{name}")
    def video(campaign_id: str, name: str, request: Request) -> Response:
        """One video, with byte ranges (players seek with them; Safari plays nothing without)."""
        user = current_user(request)
        uri = studio.video(user, campaign_id, name) if user else None
        if uri is None:
            return Response(status_code=404)
        try:
            size = storage.size(uri)
        except FileNotFoundError:  # deleted since its row finished (the campaign, or the video by hand)
            return Response(status_code=404)
        first, last = _byte_range(request.headers.get("range"), size)
        headers = {"Accept-Ranges": "bytes", "Content-Length": str(last - first + 1)}
        if request.headers.get("range") is None:
            return StreamingResponse(storage.iter_range(uri, 0, size, _CHUNK), media_type="video/mp4", headers=headers)
        if first > last:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        return StreamingResponse(
            storage.iter_range(uri, first, last + 1, _CHUNK), status_code=206, media_type="video/mp4", headers=headers
        )

    @app.get("/files/{campaign_id}/thumb/{row_id}.jpg")
    def thumbnail(campaign_id: str, row_id: str, request: Request) -> Response:
        user = current_user(request)
        data = studio.thumbnail(user, campaign_id, row_id) if user else None
        if data is None:
            return Response(status_code=404)
        return Response(data, media_type="image/jpeg")

    blocks = build_pages(studio, claims, sign_out=users_file is not None)
    app.state.gradio_pages = blocks  # its lists of uploads, for the server's sweeps
    # Gradio checks that a file a client names was uploaded only in an app that has "launched";
    # mount_gradio_app, unlike launch(), never says so, and Gradio would then take any server path
    # a client sends as an upload (copying it into its cache): a user could render, probe or have
    # the studio delete any file it can read, other users' videos included
    blocks.has_launched = True
    # events waiting beyond this are refused ("queue full") instead of piling up without end
    # api_open=False: Gradio's direct routes (`/run/<event>`) would run any event at once, past the
    # queue's size and every event group's concurrency limit (the pages use the queue alone)
    # threads of the events' own (their groups' limits together, 52): at Gradio's default of 40 they
    # shared the web server's pool, and events at their limits held every request's thread
    blocks.max_threads = EVENT_THREADS
    blocks.queue(max_size=EVENT_QUEUE_SIZE, api_open=False)
    max_bytes = int(studio.cfg.max_upload_mb * 2**20)
    return gr.mount_gradio_app(
        app,
        blocks,
        path=UI_PATH,
        auth_dependency=current_user,
        max_file_size=max_bytes,
        footer_links=[],
        run_history=False,  # else Gradio keeps every event's outputs (campaign lists, logs) in the browser
        # an error no event expects shows as "Error", not its text: store paths, bucket names
        # and other users' file names stay off the pages (it is logged on the server)
        show_error=False,
        head=SESSION_ENDED_JS if users is not None else None,
        enable_monitoring=False,  # Gradio's /monitoring pages: every user's event counts and timings
    )


def build_pages(studio: Studio, claims: UploadClaims, sign_out: bool) -> gr.Blocks:
    models = list(studio.models)
    audio_types, avatar_types = list(AUDIO_TYPES), list(AVATAR_TYPES)
    max_bytes = int(studio.cfg.max_upload_mb * 2**20)
    with gr.Blocks(title="heygem_ray studio") as pages:
        who = gr.Markdown()
        with gr.Tabs() as tabs:
            with gr.Tab("New campaign", id="new"):
                name = gr.Textbox(label="Campaign name", max_length=120)
                with gr.Row():
                    audios = gr.File(label="Narrations (audio)", file_count="multiple", file_types=audio_types)
                    avatars = gr.File(
                        label="Presenters (videos or photos)", file_count="multiple", file_types=avatar_types
                    )
                manifest = gr.File(
                    label="…or a manifest (Parquet or CSV: audio, avatar)", file_types=list(MANIFEST_TYPES)
                )
                checked = gr.Markdown(elem_id="upload-check")
                with gr.Row():
                    model = gr.Dropdown(models, value=models[0], label="Model")
                    quality = gr.Radio(list(QUALITIES), value="standard", label="Quality")
                submit = gr.Button("Render", variant="primary", elem_id="submit")
                submitted = gr.Markdown(elem_id="submitted")
            with gr.Tab("Campaigns", id="campaigns"):
                listing = gr.Dataframe(
                    headers=["campaign", "name", "status", "rows", "ETA", "created"],
                    interactive=False,
                    label="Your campaigns",
                )
                # any value may come back (the choices are per user, filled in later); the studio checks it is theirs
                chosen = gr.Dropdown([], label="Open campaign", elem_id="chosen", allow_custom_value=True)
                status = gr.HTML(elem_id="campaign-status")
                with gr.Row():
                    cancel = gr.Button("Cancel", elem_id="cancel")
                    rerun = gr.Button("Re-run failed rows", elem_id="rerun")
                    delete = gr.Button("Delete", variant="stop", elem_id="delete")
                acted = gr.Markdown()
                rows = gr.Dataframe(headers=["row", "status", "seconds", "error"], interactive=False, label="Rows")
                gallery = gr.HTML(elem_id="gallery")
                log_tail = gr.Textbox(label="Job log (last lines)", lines=8, max_lines=20, interactive=False)
        timer = gr.Timer(3.0)

        def user_of(request: gr.Request) -> str:
            """The signed-in user; never a default one where there are users."""
            if request.username:
                return request.username
            if sign_out:
                raise gr.Error("Please sign in again.")
            return LOCAL_USER

        def page_of(request: gr.Request) -> str:
            """Who holds an upload (`UploadClaims`): one page (Gradio's session) of the signed-in
            user. Gradio names an upload by its content: a user's two pages with the same presenter
            share its file as two users do."""
            return f"{user_of(request)}/{request.session_hash or ''}"

        def whoami(request: gr.Request) -> str:
            user = user_of(request)
            out = f"**heygem_ray studio** — signed in as `{user}`" + (" · [sign out](/logout)" if sign_out else "")
            problem = studio.cluster.problem()
            if problem:
                out += f"\n\n⚠️ {problem}. Campaigns can be prepared but not submitted until it answers."
            return out

        def check(
            audio_files: list[str] | None,
            avatar_files: list[str] | None,
            manifest_file: str | None,
            request: gr.Request,
        ) -> str:
            """At upload time: each file's type, size and that it decodes (each file once: the
            event comes with every file picked so far); and the row count: the plan's rows where
            one is uploaded, else every presenter with every narration."""
            problems = []
            user = user_of(request)
            plan = [manifest_file] if manifest_file else []
            claims.claim(page_of(request), claims.own(user, [*(audio_files or []), *(avatar_files or []), *plan]))
            counted: list[int] = []
            names: dict[str, list[str]] = {}  # the stored names of the files that passed
            for files, kind, what in (
                (audio_files or [], "audio", "narrations"),
                (avatar_files or [], "avatar", "presenters"),
            ):
                try:
                    files = distinct_uploads(claims.own(user, files), what)
                except UploadError as exc:
                    return f"❌ {exc}"
                counted.append(len(files))
                names[kind] = []
                for path in files:
                    try:  # one call: a file gone between two would raise past this page's check
                        names[kind].append(studio.store.checks.name(path, kind, max_bytes))
                    except UploadError as exc:
                        problems.append(f"- ❌ {exc}")
            n_audio, n_avatar = counted
            count = f"**{n_avatar} presenter(s) × {n_audio} narration(s) = {n_avatar * n_audio} video(s)**"
            if manifest_file:
                try:
                    table = read_uploaded_manifest(manifest_file)
                except UploadError as exc:
                    return f"❌ {exc}"
                shown = html.escape(os.path.basename(manifest_file))
                count = f"**{table.num_rows} video(s)**, one a row of the plan {shown}"
                # what Render would refuse, said now (its files may still be to come)
                said = [repeated_name(name, kind) for kind in names for name in repeated_names(names[kind])]
                said += resolve_uploads(table, names, studio.store.own(user))[1]
                problems += [f"- ❌ {shown}: {html.escape(why)}" for why in said]
            if n_audio or n_avatar:  # the web server keeps them only so long (they count in the quota)
                count += f" · uploads wait {UPLOAD_WINDOW_SECONDS / 60:.0f} minutes for Render"
            return "\n".join([count, *problems])

        async def create(
            title: str,
            audio_files: list[str] | None,
            avatar_files: list[str] | None,
            manifest_file: str | None,
            model_name: str,
            quality_name: str,
            request: gr.Request,
        ) -> tuple[str, gr.Dropdown]:
            user, page = user_of(request), page_of(request)
            uploads = claims.own(
                user, [*(audio_files or []), *(avatar_files or []), *([manifest_file] if manifest_file else [])]
            )
            claims.claim(page, uploads)

            def save() -> tuple[str, str | None, list[tuple[str, str]] | None]:
                saved: str | None  # the campaign in the store: the page opens it
                try:
                    record = studio.create(
                        user, title, audio_files or [], avatar_files or [], manifest_file, model_name, quality_name
                    )
                    message = (
                        f"✅ Campaign **{html.escape(record.name)}** submitted: {record.rows} video(s). "
                        "Follow it on the Campaigns tab."
                    )
                    saved = record.id
                except UploadError as exc:
                    return f"❌ {exc}", None, None
                except SubmitUnconfirmed as exc:  # saved: its uploads are in the store, as below
                    message = f"❌ saved, but the cluster did not confirm its submit: {exc}. {UNCONFIRMED}"
                    saved = exc.saved
                except ClusterUnavailable as exc:
                    message = f"❌ saved, but not submitted: {exc}. {NOT_SUBMITTED}"
                    saved = exc.saved
                except StoreFailed as exc:
                    if exc.saved is None:  # its uploads stay on this page, to Render again
                        return f"❌ {exc}: nothing was saved. Press Render again in a while.", None, None
                    message = f"❌ saved, but not submitted: {exc}. It is open on the Campaigns tab: re-run it there."
                    saved = exc.saved
                for path in uploads:  # in the store now: they leave the web server's cache, unless another user's
                    if claims.release(page, path) and not studio.held_elsewhere(path, uploads.count(path)):
                        _remove_quietly(path)
                try:
                    choices = _choices(studio, user)
                except OSError:  # the store failing still: its message is what the page must show
                    choices = [(saved, saved)] if saved else []
                return message, saved, choices

            try:
                saving = studio.save_later(user, uploads, save)
            except UploadError as exc:
                return f"❌ {exc}", gr.Dropdown()
            # shielded: a page closed meanwhile (a refresh) ends this event, not the save it asked for
            message, saved, choices = await asyncio.shield(asyncio.wrap_future(saving))
            if choices is None:
                return message, gr.Dropdown()
            # the campaign opened on the Campaigns tab: a failed submit's too, to re-run from there
            return message, gr.Dropdown(choices=choices, value=saved) if saved else gr.Dropdown(choices=choices)

        def emptied_when_saved(message: str) -> tuple:
            """After create: the file boxes emptied once a campaign holds their uploads (left as
            they were, they named files gone from the web server: a second Render said "expired")."""
            saved = message.startswith(("✅", "❌ saved, but"))
            return (None, None, None) if saved else (gr.update(), gr.update(), gr.update())

        def opened(campaign_id: str | None, request: gr.Request) -> tuple:
            """The page as it loads: the campaign its address names (`?campaign=`, kept there as
            one is opened: a refresh, or the link, opens it again), if it is the user's, on the
            Campaigns tab."""
            try:
                own = campaign_id if campaign_id and studio.has_campaign(user_of(request), campaign_id) else None
            except OSError:  # said by the refresh below
                own = None
            table, chooser, *rest = refresh(own, request)
            try:
                choices = _choices(studio, user_of(request)) if own is not None else []
            except OSError:  # said by the refresh above
                own = None
            if own is None:
                return table, chooser, *rest, gr.Tabs()
            return (
                table,
                gr.Dropdown(choices=choices, value=own),
                *rest,
                gr.Tabs(selected="campaigns"),
            )

        def refresh(campaign_id: str | None, request: gr.Request) -> tuple:
            try:
                return shown_now(campaign_id, user_of(request))
            except OSError as exc:  # every few seconds Gradio's bare "Error" otherwise; the page stays as it was
                said = f"❌ {StoreFailed(exc)}: your campaigns show again once it answers."
                return gr.update(), gr.update(), f"<p>{html.escape(said)}</p>", gr.update(), gr.update(), gr.update()

        def shown_now(campaign_id: str | None, user: str) -> tuple:
            views, records = studio.campaigns(user)
            table = [
                [
                    v.record.id,
                    v.record.name,
                    v.status,
                    f"{v.rows_done}/{v.rows_total}",
                    "" if v.eta_seconds is None else _time_left(v.eta_seconds),
                    _when(v.record.created),
                ]
                for v in views
            ]
            choices = [(f"{r.name} ({r.id})", r.id) for r in records]
            # the table lists the newest; the chooser offers every campaign
            shown = f"The list above shows the {len(views)} newest of your {len(records)} campaigns."
            info = shown if len(records) > len(views) else None
            if studio.being_saved(user):  # a Render under way, perhaps from a page since closed
                info = " ".join(filter(None, ["A campaign of yours is being saved: it is listed once saved.", info]))
            view = studio.campaign(user, campaign_id) if campaign_id else None
            if view is None or not campaign_id:
                return table, gr.Dropdown(choices=choices, info=info), "", [], "", ""
            return (
                table,
                # no value: one set from what was chosen when this refresh began took the chooser
                # back to it from a campaign picked meanwhile
                gr.Dropdown(choices=choices, info=info),
                _status_html(view),
                [
                    [r["id"], r["status"], "" if r["seconds"] is None else f"{r['seconds']:.1f}", r["error"]]
                    for r in rows_shown(view.rows)
                ],
                _gallery_html(studio, view),
                studio.job_log(user, campaign_id),
            )

        def acting(action: Callable[[str, str], object], done: str, nothing: str) -> Callable[..., str]:
            """An event that does `action` (cancel, re-run) on the open campaign of the signed-in user."""

            def act(campaign_id: str | None, request: gr.Request) -> str:
                if not campaign_id:
                    return ""
                try:
                    if not studio.has_campaign(user_of(request), campaign_id):
                        return "There is no such campaign (deleted on another page?)."
                    return done if action(user_of(request), campaign_id) else nothing
                except SubmitUnconfirmed as exc:
                    return f"❌ the cluster did not confirm the submit: {exc}. {UNCONFIRMED}"
                except (ClusterUnavailable, UploadError) as exc:  # UploadError: a re-run past the user's limit
                    return f"❌ {exc}"
                except OSError as exc:  # the store's: not Gradio's bare "Error"
                    return f"❌ {StoreFailed(exc)}: try again in a while."

            return act

        do_cancel = acting(studio.cancel, "Stopping: rows that did not finish will be reported.", "Nothing to cancel.")
        do_rerun = acting(studio.rerun, "Re-running: finished rows are kept.", "It is still running.")
        do_delete = acting(
            studio.delete, "Deleted, with its uploads and videos.", "Not deleted: cancel it first while it runs."
        )

        # Gradio queues the events of one function together, under the lowest limit among them (1
        # by default): each group gets its own id and limit, or one user's slow refresh (a cluster
        # that answers late) would hold every other user's pages
        pages.load(whoami, None, who, concurrency_id="whoami", concurrency_limit=8)
        for box in (audios, avatars, manifest):
            box.change(check, [audios, avatars, manifest], checked, concurrency_id="check", concurrency_limit=4)
        # never queued here: a Render waiting for a slot was dropped by a refresh (Gradio clears a
        # closed page's queued events), its uploads with it; the studio's own threads take turns
        # (`Studio.save_later`)
        submit.click(
            create, [name, audios, avatars, manifest, model, quality], [submitted, chosen], concurrency_limit=None
        ).success(emptied_when_saved, [submitted], [audios, avatars, manifest], api_visibility="private")
        outputs = [listing, chosen, status, rows, gallery, log_tail]
        poll: dict = {"concurrency_id": "refresh", "concurrency_limit": 16}
        pages.load(opened, [chosen], [*outputs, tabs], js=FROM_ADDRESS, **poll)
        chosen.change(refresh, [chosen], outputs, show_progress="hidden", **poll)
        chosen.change(None, [chosen], None, js=TO_ADDRESS)
        timer.tick(refresh, [chosen], outputs, show_progress="hidden", **poll)
        act: dict = {"concurrency_id": "act", "concurrency_limit": 8}
        cancel.click(do_cancel, [chosen], acted, api_name="do_cancel", **act)
        rerun.click(do_rerun, [chosen], acted, api_name="do_rerun", **act)
        # the browser asks first; a "no" sends no campaign, and nothing happens
        confirm = "(c) => (c && confirm('Delete this campaign, its uploads and its videos?')) ? c : null"
        delete.click(do_delete, [chosen], acted, api_name="do_delete", js=confirm, **act)
    return pages


def _choices(studio: Studio, user: str) -> list[tuple[str, str]]:
    return [(f"{r.name} ({r.id})", r.id) for r in studio.store.campaigns(user)]


def _status_html(view: CampaignView) -> str:
    total = max(1, view.rows_total)
    percent = round(100 * view.rows_done / total)
    eta = "" if view.eta_seconds is None else f" · about {_time_left(view.eta_seconds)} left"
    frames = f" · {view.frames_done} frames" if view.frames_done else ""
    zip_link = (
        f'<a id="download-all" href="/files/{quote(view.record.id)}/all.zip">Download all videos (zip)</a>'
        if view.rows_done
        else ""
    )
    note = f"<p>⚠️ {html.escape(view.note)}</p>" if view.note else ""
    return (
        f'<div class="campaign" data-status="{view.status}" data-percent="{percent}">'
        f"<p><b>{html.escape(view.record.name)}</b>: {view.status}, {view.rows_done}/{view.rows_total} rows"
        f" ({view.rows_failed} failed){frames}{eta}</p>"
        f'<progress max="100" value="{percent}" style="width:100%"></progress>'
        f"<p>{zip_link}</p>{note}</div>"
    )


#: rows the Campaigns tab lists (failed first) and videos its gallery shows: every page refresh
#: (each 3 s) sends them, and a campaign may have 100,000 rows (the zip download has every video)
ROWS_SHOWN = 500
VIDEOS_SHOWN = 48


def rows_shown(rows: list[dict]) -> list[dict]:
    """The rows the page lists: the failed ones first (what a user acts on), then the others in
    manifest order, ROWS_SHOWN at most, with a last line saying how many are left out."""
    failed = [r for r in rows if r["status"] == "failed"]
    ordered = failed + [r for r in rows if r["status"] != "failed"]
    if len(ordered) <= ROWS_SHOWN:
        return ordered
    more = {
        "id": "…",
        "status": "",
        "seconds": None,
        "error": f"{len(ordered) - ROWS_SHOWN:,} more rows not listed",
    }
    return [*ordered[:ROWS_SHOWN], more]


def _gallery_html(studio: Studio, view: CampaignView) -> str:
    """A thumbnail and a player per finished video (the first VIDEOS_SHOWN), all served by the
    routes that check the user."""
    cards: list[str] = []
    finished = studio.store.finished_videos(view.record.output)
    for row in view.rows:
        file = f"{row['id']}.mp4"
        if row["status"] not in ("ok", "skipped") or file not in finished:
            continue
        if len(cards) == VIDEOS_SHOWN:
            cards.append(f"<p>{len(finished) - VIDEOS_SHOWN:,} more videos: download them all as a zip.</p>")
            break
        base, name = f"/files/{quote(view.record.id)}", html.escape(row["id"], quote=True)
        # named for screen readers: 48 players and links alike ("download") said nothing of which
        cards.append(
            f'<figure class="thumb" style="display:inline-block;margin:4px">'
            f'<video controls preload="none" width="240" poster="{base}/thumb/{quote(row["id"])}.jpg" '
            f'src="{base}/video/{quote(file)}" aria-label="video {name}"></video>'
            f"<figcaption>{name} · "
            f'<a href="{base}/video/{quote(file)}" download aria-label="download {name}">download</a>'
            "</figcaption></figure>"
        )
    return "".join(cards)


def _campaign_query(campaign: str | None) -> str:
    """`?campaign=<id>` for a well-formed campaign id (the page opens it, if it is the user's), else
    nothing: no other value is carried through the sign-in."""
    return f"?campaign={campaign}" if campaign and CAMPAIGN_ID.fullmatch(campaign) else ""


def _login_html(error: str, campaign: str = "") -> str:
    message = f'<p style="color:#b00">{html.escape(error)}</p>' if error else ""
    opened = _campaign_query(campaign)  # only a well-formed id: nothing else reaches the page
    hidden = f'<input type="hidden" name="campaign" value="{opened.removeprefix("?campaign=")}">' if opened else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>heygem_ray studio: sign in</title></head><body>"
        '<main style="max-width:22rem;margin:4rem auto;font-family:sans-serif">'
        f"<h1>heygem_ray studio</h1>{message}"
        f'<form method="post" action="/login">{hidden}'
        '<p><label>Name<br><input name="name" autocomplete="username" required></label></p>'
        '<p><label>Password<br><input name="password" type="password" autocomplete="current-password" required>'
        "</label></p>"
        '<p><button type="submit">Sign in</button></p></form></main></body></html>'
    )


def _byte_range(header: str | None, size: int) -> tuple[int, int]:
    """(first, last) byte of a `Range: bytes=a-b` header (one range; `a-`, `-n` too) within a file
    of `size` bytes; the whole file without one; first > last when it is not satisfiable."""
    if not header or not header.startswith("bytes=") or "," in header:
        return 0, size - 1
    start, _, end = header[len("bytes=") :].strip().partition("-")
    try:
        if not start:  # the last n bytes
            return max(0, size - int(end)), size - 1
        first = int(start)
        last = min(size - 1, int(end)) if end else size - 1
    except ValueError:
        return 0, size - 1
    return first, last


def _time_left(seconds: float) -> str:
    """A campaign's time left as a person reads it: "45 s", "12 min", "3 h 20 min" (a large
    campaign's was "345600 s")."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60} min"


def _when(timestamp: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def _length(request: Request) -> int | None:
    """The request's Content-Length, or None when it has none (or not a number)."""
    try:
        return int(request.headers.get("content-length", ""))
    except ValueError:
        return None


def _names_a_url(path: str) -> bool:
    """Whether a request for one of Gradio's file routes names a URL rather than a file."""
    named = _file_named(path)
    return named is not None and ("://" in named or named.lower().startswith(("http:", "https:")))


def _file_named(path: str) -> str | None:
    """What a request path for one of Gradio's file routes names (None: no file route)."""
    for route in FILE_ROUTES:
        if path.startswith(route):
            return path[len(route) :]
    return None


def _from_this_account(request: Request) -> bool:
    """Whether a request comes from the account running the studio (or root), where the host can
    tell (Linux: the kernel's socket tables); taken for yes where it cannot."""
    client = (request.client.host, request.client.port) if request.client else None
    uid = loopback_peer_uid(client, request.scope.get("server"))
    return uid is None or uid in (os.getuid(), 0)  # NOBODY (no such connection) is refused


def _json_or_none(body: bytes) -> object:
    """A request body's JSON (a page event's); None where it is none (Gradio answers it)."""
    try:
        return json.loads(body) if body else None
    except (ValueError, RecursionError):  # RecursionError: nested past Python's limit
        return None


def _after(path: str, prefix: str) -> str | None:
    """The path's first segment after `prefix` (a heartbeat's page), None where it is not under it."""
    if not path.startswith(prefix):
        return None
    return path[len(prefix) :].split("/", 1)[0] or None


def _linked_files_refused(data: object) -> Response | None:
    """A page event (its JSON) naming a file by URL: Gradio would fetch it into its cache, with no
    size limit and past the upload quota, before the studio sees it. Files come by upload only."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("path"), str) and item["path"].lower().startswith(("http://", "https://")):
                return Response("files must be uploaded, not linked", status_code=400)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _in_uploads(path: str) -> bool:
    folder = os.path.realpath(gradio_upload_folder())
    try:
        return os.path.commonpath([folder, os.path.realpath(path)]) == folder
    except ValueError:  # a NUL in it, or another drive: no file of the upload folder
        return False


def _upload_answer(body: bytes) -> list[str]:
    """The paths in Gradio's upload folder its upload route answered with (a JSON list)."""
    try:
        paths = json.loads(body)
    except ValueError:
        return []
    listed = [p for p in paths if isinstance(p, str)] if isinstance(paths, list) else []
    return [p for p in listed if _in_uploads(p)]


class UploadClaims:
    """Who holds each file of Gradio's upload folder lately: the pages (`page_of`) whose events
    named it, and the uploads of it that arrived and no page has claimed yet (each arrival is its
    user's; a page's first claim of a file takes one of its user's). Gradio names an upload by its
    content: two users, or one user's two pages, who upload the same file (a company's presenter
    video) share one path, and the campaign one of them makes must not delete it from under the
    other, whose page event may still wait in the queue."""

    def __init__(self, window: float):
        self.window = window
        self.since = time.time()  # who uploaded what is known from here: a restart forgets it
        self._lock = threading.Lock()
        self._holders: dict[str, dict[str, float]] = {}  # real path -> page -> when last claimed
        self._arrivals: dict[str, dict[str, list[float]]] = {}  # real path -> user -> unclaimed arrivals
        self._uploaders: dict[str, dict[str, float]] = {}  # real path -> user -> when last uploaded (a day)

    def arrived(self, user: str, paths: list[str]) -> None:
        """`user` uploaded `paths` (one arrival each, until a page of theirs claims it)."""
        now = time.time()
        with self._lock:
            for path in paths:
                key = os.path.realpath(path)
                self._arrivals.setdefault(key, {}).setdefault(user, []).append(now)
                self._uploaders.setdefault(key, {})[user] = now
            self._expire(now)

    def uploaded_by(self, user: str, path: str) -> bool:
        """Whether `user` uploaded the file at `path` within the window."""
        when = self._uploaded_at(user, path)
        return when is not None and when >= time.time() - self.window

    def _uploaded_at(self, user: str, path: str) -> float | None:
        with self._lock:
            return self._uploaders.get(os.path.realpath(path), {}).get(user)

    def own(self, user: str, paths: list[str]) -> list[str]:
        """`paths`, each checked to be one `user` uploaded (in Gradio's upload folder, under names no
        one can guess, and theirs: a link to another user's, leaked from a page, names that
        user's), before the studio reads or removes them."""
        for path in paths:
            when = self._uploaded_at(user, path) if _in_uploads(path) else None
            if when is None and _in_uploads(path) and self._before_start(path):
                # the page outlived a restart: its files are still kept, but whose they are is not known
                raise gr.Error(
                    f"{os.path.basename(path)} was uploaded before the studio restarted, which forgets who uploaded "
                    "what: upload it again"
                )
            if when is None:
                raise gr.Error(f"{os.path.basename(path)} is not one of your uploads")
            if when < time.time() - self.window:  # theirs: "not yours" sent its uploader looking for why
                raise gr.Error(
                    f"{os.path.basename(path)}: uploads are kept {self.window / 60:.0f} minutes until a campaign "
                    "takes them, and this one expired: upload it again"
                )
        return paths

    def _before_start(self, path: str) -> bool:
        """Whether the file at `path` came before this studio started, and no one uploaded it since."""
        with self._lock:
            if self._uploaders.get(os.path.realpath(path)):
                return False
        try:
            return os.path.getmtime(path) < self.since
        except OSError:
            return False

    def claim(self, holder: str, paths: list[str]) -> None:
        now = time.time()
        user = holder.rsplit("/", 1)[0]
        with self._lock:
            for path in paths:
                key = os.path.realpath(path)
                pages = self._holders.setdefault(key, {})
                waiting = self._arrivals.get(key, {}).get(user)
                if holder not in pages and waiting:
                    waiting.pop(0)  # this page's upload of it
                pages[holder] = now
            self._expire(now)

    def _expire(self, now: float) -> None:
        """Forget what is older than the window: Gradio's copy is gone by then."""
        for path in [p for p, pages in self._holders.items() if max(pages.values()) < now - self.window]:
            del self._holders[path]
        for path, users in list(self._arrivals.items()):
            for user, times in list(users.items()):
                users[user] = [t for t in times if t >= now - self.window]
                if not users[user]:
                    del users[user]
            if not users:
                del self._arrivals[path]
        for path, uploaders in list(self._uploaders.items()):  # kept longer, to say an upload expired
            if max(uploaders.values()) < now - UPLOADERS_KEPT_SECONDS:
                del self._uploaders[path]

    def release(self, holder: str, path: str) -> bool:
        """`holder` is done with `path`: whether no other page claimed it within the window, and no
        upload of it waits for a page to claim it (then it may go)."""
        now, key = time.time(), os.path.realpath(path)
        with self._lock:
            self._expire(now)
            pages = self._holders.pop(key, {})
            others = {h: t for h, t in pages.items() if h != holder and t >= now - self.window}
            if others:
                self._holders[key] = others
            return not others and not self._arrivals.get(key)


#: how long who uploaded a file is remembered, past its window: an event naming it then is told it
#: expired, not that it is someone else's
UPLOADERS_KEPT_SECONDS = 86400.0


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError as exc:
        logging.getLogger("heygem_ray.studio").debug("could not remove upload %s: %s", path, exc)
