"""The browse web app: three GET routes over an `OutputIndex`, pages rendered by Jinja2 with autoescaping.

    GET /               the grid: filters, search, sort and page as query parameters
    GET /sample/<key>   one sample: its image, every caption set beside the original, each stage's status
    GET /thumb/<key>    its thumbnail (`?size=large` for the sample page)

Read-only: there is no other route and no other method. Keys and captions are untrusted text: they reach the page
only through autoescaped templates (and URL quoting), and a key reaches a file only as a row of the images index
(a key not in it is a 404). A Content-Security-Policy without scripts backs that up.
"""

from __future__ import annotations

import io
import socket
import textwrap
import urllib.parse
from typing import Any

import fsspec
import jinja2
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from curation.browse.index import ORIGINAL, OutputIndex, QueryError
from curation.browse.thumbs import SIZES, Thumbnails
from curation.errors import SetupError
from curation.imaging import ImageDecodeError
from curation.layout import DEFAULT_SET

DEFAULT_PORT = 8470
LOOPBACK = ("127.0.0.1", "localhost")
_HEADERS = {
    # No script may run on these pages, whatever a caption holds; images only from this server.
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("curation.browse", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
)


def _set_label(caption_set: str) -> str:
    return "original" if caption_set == ORIGINAL else ("default" if caption_set == DEFAULT_SET else caption_set)


def _render(name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(_TEMPLATES.get_template(name).render(**context), status_code, headers=_HEADERS)


def _not_found(what: str) -> HTMLResponse:
    return _render("error.html", 404, title="not found", message=what)


def highlighted(text: str | None) -> tuple[list[tuple[str, bool]], str]:
    """`text` cut into (piece, is a noun by the Table 1 rule) for the template to mark (escaped as any text), and
    why nothing is marked when the rule could not run ("" otherwise)."""
    from curation.stats.nouns import noun_spans

    if not text:
        return [], ""
    try:
        spans = noun_spans(text)
    except LookupError:  # NLTK's data is not installed where the server runs
        return [
            (text, False)
        ], "nouns not marked: NLTK data missing (nltk.download('punkt_tab') and ('averaged_perceptron_tagger_eng'))"
    except Exception:  # NLTK's regex timeout on a pathological caption: show it unmarked
        return [(text, False)], "nouns not marked: the tokenizer gave up on this caption"
    out, cursor = [], 0
    for start, end in spans:
        if start > cursor:
            out.append((text[cursor:start], False))
        out.append((text[start:end], True))
        cursor = end
    if cursor < len(text):
        out.append((text[cursor:], False))
    return out, ""


def placeholder(message: str, side: int) -> bytes:
    """A grey JPEG saying why there is no thumbnail (sent with an error status, but a browser still shows it)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (side, side * 3 // 4), (240, 228, 228))
    ImageDraw.Draw(image).multiline_text((8, 8), textwrap.fill(message, 30), fill=(150, 50, 50))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=80)
    return out.getvalue()


def make_app(index: OutputIndex, host: str = "127.0.0.1") -> Starlette:
    """The Starlette app over one output's index."""
    thumbs = Thumbnails(index.layout.images)

    def grid(request: Request) -> Response:
        params = dict(request.query_params)
        query = index.from_params(params)
        try:
            page = index.page(query)
        except QueryError as exc:
            return _render("error.html", 400, title="bad search", message=str(exc))
        pages = max(1, -(-page.total // index.page_size))

        def link(**changes: Any) -> str:
            merged = {k: v for k, v in {**params, **changes}.items() if v not in ("", None)}
            return "/?" + urllib.parse.urlencode(merged)

        return _render(
            "grid.html",
            title=f"{index.layout.name}: samples",
            index=index,
            query=query,
            params=params,
            page=page,
            pages=pages,
            numeric=list(index.numeric_columns(query.caption_set)),
            set_label=_set_label,
            prev_link=link(page=query.page - 1) if query.page > 1 else None,
            next_link=link(page=query.page + 1) if query.page < pages else None,
            first=(query.page - 1) * index.page_size,
        )

    def sample(request: Request) -> Response:
        key = request.path_params["key"]
        image = index.row("images", key)
        if image is None:
            return _not_found(f"no sample {key} in this output's images index")
        shard = image["shard"]
        sets = []
        for s in index.sets:
            row = index.row(index.caption_view(s), key, shard) or {}
            nouns = index.row(index.nouns_view(s), key, shard) or {}
            pieces, note = highlighted(row.get("caption"))
            sets.append(
                {"name": _set_label(s), "row": row, "pieces": pieces, "note": note, "nouns": nouns.get("nouns")}
            )
        original_nouns = index.row(index.nouns_view(ORIGINAL), key, shard) or {}
        original = {
            "name": "original",
            "row": {"status": image["status"], "caption": image["original_caption"]},
            **dict(zip(("pieces", "note"), highlighted(image["original_caption"]), strict=True)),
            "nouns": original_nouns.get("nouns"),
        }
        dedup = index.row("dedup", key, shard)
        members = index.group_members(dedup["group"]) if dedup and dedup.get("group") else []
        quality = index.row("quality", key, shard) or {}
        return _render(
            "sample.html",
            title=f"{key}",
            key=key,
            image=image,
            sets=[original, *sets],
            dedup=dedup,
            members=members,
            size_filter=index.row("size_filter", key, shard),
            scores={k: v for k, v in quality.items() if k in index.scores},
        )

    def thumb(request: Request) -> Response:
        key = request.path_params["key"]
        size = request.query_params.get("size", "small")
        if size not in SIZES:
            return PlainTextResponse(f"size: one of {', '.join(SIZES)}", 400, headers=_HEADERS)
        where = index.locate(key)
        if where is None:
            return PlainTextResponse("no such sample", 404, headers=_HEADERS)
        if where.status == "failed":
            return PlainTextResponse("this sample failed at ingest: no image kept", 404, headers=_HEADERS)
        try:
            data = thumbs.get(key, where, size)
        except (ImageDecodeError, FileNotFoundError) as exc:
            reason = exc.reason if isinstance(exc, ImageDecodeError) else "member missing"
            return Response(placeholder(f"cannot decode: {reason}", SIZES[size] // 2), 422, media_type="image/jpeg",
                            headers=_HEADERS)  # fmt: skip
        return Response(data, media_type="image/jpeg", headers={**_HEADERS, "Cache-Control": "max-age=3600"})

    def style(request: Request) -> Response:
        css = (_TEMPLATES.loader.get_source(_TEMPLATES, "style.css"))[0]
        return Response(css, media_type="text/css", headers={**_HEADERS, "Cache-Control": "max-age=3600"})

    middleware = []
    if host in LOOPBACK:  # a page elsewhere cannot read this one by rebinding its own name to 127.0.0.1
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK)))
    return Starlette(
        routes=[
            Route("/", grid, methods=["GET"]),
            Route("/sample/{key}", sample, methods=["GET"]),
            Route("/thumb/{key}", thumb, methods=["GET"]),
            Route("/style.css", style, methods=["GET"]),
        ],
        middleware=middleware,
    )


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), or one line saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise SetupError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --port") from None
    return sock


def serve(output: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> int:
    """`curation browse`: serve until Ctrl-C."""
    import uvicorn

    fsspec.core.url_to_fs(output)  # an unknown protocol fails here, before anything listens
    index = OutputIndex(output)
    sock = listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"browse: http://{shown}:{sock.getsockname()[1]}/  ({output}, read-only; Ctrl-C stops)", flush=True)
    config = uvicorn.Config(make_app(index, host), log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
    return 0
