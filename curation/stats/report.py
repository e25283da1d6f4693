"""The statistics report: Table 1 beside the paper's, plots and a caption gallery, as static files.

``write_report`` writes into one folder: ``table1.md`` (human-readable numbers, the paper's rows under
"published in the PixArt-α paper"), ``table1.json`` (exact numbers), PNG plots and ``index.html`` that
shows them. Plots are drawn with matplotlib's object API and Agg canvas, so no global backend is touched.
"""

from __future__ import annotations

import html
import json
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from curation.records import MAX_CAPTION_CHARS
from curation.stats.nouns import VALID_THRESHOLD, NounStats
from curation.stats.quality import AESTHETIC, CLIP, NSFW, QualitySection, score_field, score_range

# Table 1 of PixArt-alpha (arXiv 2310.00426) as published: rounded there, so kept as printed. The paper
# gives no image counts. vn_dn_pct is the printed percentage (it was computed before rounding VN and DN).
PAPER_ROWS: tuple[dict[str, Any], ...] = (
    {"name": "LAION", "images": None, "vn": 210_000, "dn": 2_461_000, "vn_dn_pct": 8.5,
     "total_nouns": 72_000_000, "nouns_per_image": 6.4},
    {"name": "LAION-LLaVA", "images": None, "vn": 85_000, "dn": 646_000, "vn_dn_pct": 13.3,
     "total_nouns": 233_900_000, "nouns_per_image": 20.9},
    {"name": "SAM-LLaVA", "images": None, "vn": 23_000, "dn": 124_000, "vn_dn_pct": 18.6,
     "total_nouns": 327_900_000, "nouns_per_image": 29.3},
    {"name": "Internal", "images": None, "vn": 152_000, "dn": 582_000, "vn_dn_pct": 26.1,
     "total_nouns": 136_600_000, "nouns_per_image": 12.2},
)  # fmt: skip

TOP_NOUNS = 30
LABEL_CHARS = 24  # a plot label longer than this is cut (a 1 MB "noun" would cost minutes to lay out)
_RANK_POINTS = 2000  # rank-frequency curves are drawn on at most this many log-spaced ranks


def distinct_human(n: int) -> str:
    """Distinct-noun counts as the paper prints them: thousands as "646K", small counts exact."""
    return f"{round(n / 1000)}K" if n >= 10_000 else str(n)


def total_human(n: int) -> str:
    """Totals as the paper prints them: "233.9M"; below a million "12.3K" or exact."""
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}K" if n >= 10_000 else str(n)


def table1_cells(row: Mapping[str, Any]) -> dict[str, str]:
    """The printed cells of one Table 1 row (a ``NounStats.table1_row`` or a ``PAPER_ROWS`` entry)."""
    images = row["images"]
    cells = {
        "Dataset": str(row["name"]),
        "Images": "–" if images is None else f"{images:,}",
        "VN/DN": f"{distinct_human(row['vn'])}/{distinct_human(row['dn'])} = {row['vn_dn_pct']:.1f}%",
        "Total Noun": total_human(row["total_nouns"]),
        "Average": f"{row['nouns_per_image']:.1f}/Img",
    }
    if "clip_score" in row:  # the quality stage's mean CLIP score of the row's captions
        cells["CLIP score"] = "–" if row["clip_score"] is None else f"{row['clip_score']:.2f}"
    return cells


def _markdown_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cells = [table1_cells(row) for row in rows]
    header = list(cells[0]) if cells else list(table1_cells(PAPER_ROWS[0]))
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for c in cells:
        lines.append("| " + " | ".join(c[h].replace("|", "\\|") for h in header) + " |")
    return lines


def _rule_text(valid_threshold: int) -> str:
    return (
        "Nouns by the PixArt-α rule: NLTK punkt_tab sentences, word_tokenize, pos_tag; tags NN, NNS, NNP, "
        f"NNPS, counted lower-cased. VN: distinct nouns appearing more than {valid_threshold} times; "
        "DN: distinct nouns; Average: nouns per image."
    )


CLIP_NOTE = (
    "CLIP score: the mean CLIPScore (max(100 cos, 0), `curation quality`) of the row's captions against their "
    "images, over the samples scored: which captioner agrees best with the images."
)


def _write_table1_md(path: Path, rows: list[dict[str, Any]], valid_threshold: int) -> None:
    lines = ["# Table 1: noun concepts", "", _rule_text(valid_threshold), ""]
    lines += [CLIP_NOTE, ""] if any("clip_score" in row for row in rows) else []
    lines += [*_markdown_table(rows), ""]
    lines += ["## published in the PixArt-α paper", "", *_markdown_table(PAPER_ROWS), ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # the report is the only user of matplotlib
        raise ImportError("the statistics report needs matplotlib: pip install matplotlib") from e
    return Figure(figsize=(width, height), layout="constrained")


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _plot_rank_frequency(path: Path, stats: Mapping[str, NounStats]) -> None:
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    drawn = False
    for name, s in stats.items():
        counts = np.array(sorted(s.noun_counts.values(), reverse=True), dtype=np.int64)
        if counts.size == 0:
            continue
        ranks = np.unique(np.geomspace(1, counts.size, num=min(_RANK_POINTS, counts.size)).astype(np.int64))
        ax.loglog(ranks, counts[ranks - 1], label=name)
        drawn = True
    if drawn:
        ax.legend()
    else:
        _no_data(ax)
    ax.set(title="Noun frequency by rank", xlabel="rank", ylabel="occurrences")
    fig.savefig(path, format="png", dpi=100)


def _plot_nouns_per_image(path: Path, stats: Mapping[str, NounStats]) -> None:
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    drawn = False
    for name, s in stats.items():
        if not s.images:
            continue
        xs = np.arange(max(s.nouns_per_image) + 1)
        share = np.array([s.nouns_per_image.get(int(x), 0) for x in xs]) / s.images
        ax.plot(xs, share, drawstyle="steps-mid", label=f"{name} (mean {s.total_nouns / s.images:.1f})")
        drawn = True
    if drawn:
        ax.legend()
    else:
        _no_data(ax)
    ax.set(title="Nouns per image", xlabel="nouns in the caption", ylabel="share of images")
    fig.savefig(path, format="png", dpi=100)


def _plot_top_nouns(path: Path, stats: Mapping[str, NounStats]) -> None:
    fig = _figure(3.6 * max(1, len(stats)), 7.4)
    # One title for the figure; each panel is titled by its row's name alone, wrapped to the panel's width.
    fig.suptitle(f"Top {TOP_NOUNS} nouns")
    axes = fig.subplots(1, max(1, len(stats)), squeeze=False)[0]
    for ax, (name, s) in zip(axes, stats.items(), strict=False):
        top = s.noun_counts.most_common(TOP_NOUNS)
        if top:
            words, counts = zip(*top, strict=True)
            ax.barh(range(len(top)), counts)
            ax.set_yticks(range(len(top)), labels=[_label(w) for w in words])
            ax.invert_yaxis()
        else:
            _no_data(ax)
        ax.set(title=textwrap.fill(name, 30), xlabel="occurrences")
    if not stats:
        _no_data(axes[0])
    fig.savefig(path, format="png", dpi=100)


def _label(word: str) -> str:
    return word if len(word) <= LABEL_CHARS else word[: LABEL_CHARS - 1] + "…"


def _bucket_order(key: str) -> tuple[int, float, str]:
    try:
        return (0, float(key), key)
    except ValueError:
        return (1, 0.0, key)


def _plot_buckets(path: Path, bucket_counts: Mapping[str, int]) -> None:
    keys = sorted(bucket_counts, key=_bucket_order)
    fig = _figure(max(7, 0.25 * len(keys)), 4.5)
    ax = fig.add_subplot()
    if keys:
        ax.bar(range(len(keys)), [bucket_counts[k] for k in keys])
        ax.set_xticks(range(len(keys)), labels=keys, rotation=90)
    else:
        _no_data(ax)
    ax.set(title="Aspect-ratio buckets (height/width)", xlabel="bucket", ylabel="images")
    fig.savefig(path, format="png", dpi=100)


def _html_table(rows: Sequence[Mapping[str, Any]]) -> str:
    cells = [table1_cells(row) for row in rows]
    header = list(cells[0]) if cells else list(table1_cells(PAPER_ROWS[0]))
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for c in cells:
        out.append("<tr>" + "".join(f"<td>{html.escape(c[h])}</td>" for h in header) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _gallery_html(thumbs: Path, gallery: Sequence[Mapping[str, Any]], anchor: str, title: str, prefix: str = "") -> str:
    """A gallery's items; thumbnails go to `thumbs/<prefix>NNNN.jpg`, named by position: keys are upstream ids and
    may hold characters unfit for a file name."""
    if not gallery:
        return ""
    items = []
    for i, item in enumerate(gallery):
        key = html.escape(str(item.get("key", "")))
        if item.get("thumbnail"):
            (thumbs / f"{prefix}{i:04d}.jpg").write_bytes(item["thumbnail"])
            img = f'<img src="gallery/{prefix}{i:04d}.jpg" alt="{key}" loading="lazy">'
        else:
            img = f'<div class="noimage">{html.escape(str(item.get("reason") or "no image"))}</div>'
        status = html.escape(str(item.get("status", "")))
        if item.get("reason"):
            status += f": {html.escape(str(item['reason']))}"
        score = f" · aesthetic {item['score']:.3f}" if item.get("score") is not None else ""
        bucket = html.escape(str(item.get("bucket") or "–"))
        lines = [f'<p class="key"><b>{key}</b> · {status} · bucket {bucket}{score}</p>']
        captions = [("original", item.get("original"), None)]
        captions += [(set_name, text, cs) for set_name, (text, cs) in dict(item.get("captions") or {}).items()]
        for caption_name, text, caption_status in captions:
            label = html.escape(caption_name) + (f" ({html.escape(caption_status)})" if caption_status else "")
            lines.append(f'<p class="caption"><b>{label}</b> {html.escape(str(text or "")[:MAX_CAPTION_CHARS])}</p>')
        items.append(f'<div class="item status-{status.split(":")[0]}">{img}{"".join(lines)}</div>')
    return f'<h2 id="{anchor}">{html.escape(title)}</h2>\n<div class="gallery">\n' + "\n".join(items) + "\n</div>"


def _tally(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{html.escape(str(k))} {v:,}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _stages_html(stages: Sequence[Any]) -> str:
    """Every stage's rows by status, failures and skips by reason, and any other tally its markers keep."""
    if not stages:
        return ""
    out = [
        '<h2 id="stages">Stages</h2>',
        '<table class="stages"><tr><th>stage</th><th>shards</th><th>rows</th><th>by status</th>'
        "<th>failed, by reason</th><th>skipped, by reason</th><th>other counts</th></tr>",
    ]
    for st in stages:
        counts = dict(st.counts)
        cells = [_tally(counts.pop(name, {})) for name in ("by_status", "by_reason", "by_skipped")]
        other = "; ".join(
            f"{html.escape(n.removeprefix('by_').replace('_', ' '))}: {_tally(t)}" for n, t in counts.items()
        )
        out.append(
            f"<tr><td>{html.escape(st.label)}</td><td>{st.shards:,}</td><td>{st.rows:,}</td>"
            + "".join(f"<td>{c}</td>" for c in cells)
            + f"<td>{other}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def _plot_histogram(path: Path, title: str, hists: Mapping[str, Any], column: str) -> None:
    """Fixed-bin histograms (`quality.Score`s of `column`'s range), drawn as steps, one line each."""
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    drawn = False
    for label, score in hists.items():
        if not score.count:
            continue
        low, high, bins = score_range(column)
        edges = np.linspace(low, high, bins + 1)
        ax.stairs(score.hist, edges, label=f"{label} (mean {score.mean:.2f}, n={score.count:,})")
        drawn = True
    if drawn:
        ax.legend()
    else:
        _no_data(ax)
    ax.set(title=title, xlabel=column.removesuffix("_"), ylabel="images")
    fig.savefig(path, format="png", dpi=100)


def _plot_bucket_means(path: Path, buckets: Mapping[str, Any]) -> None:
    keys = sorted(buckets, key=_bucket_order)
    fig = _figure(max(7, 0.25 * len(keys)), 4.5)
    ax = fig.add_subplot()
    if keys:
        ax.bar(range(len(keys)), [buckets[k].mean for k in keys])
        ax.set_xticks(range(len(keys)), labels=[f"{k} ({buckets[k].count:,})" for k in keys], rotation=90)
    else:
        _no_data(ax)
    ax.set(title="Mean aesthetic score per aspect-ratio bucket", xlabel="bucket (images)", ylabel="mean aesthetic")
    fig.savefig(path, format="png", dpi=100)


def _quality_json(path: Path, q: QualitySection) -> None:
    """`quality.json`: the section's numbers, exact (the page rounds them)."""
    p = q.partial
    data = {
        "scores": {
            c: {"count": s.count, "mean": s.mean, "bins": list(score_range(c)), "histogram": s.hist}
            for c, s in p.scores.items()
        },
        "text_truncated": p.truncated,
        "aesthetic_by_bucket": {b: {"count": s.count, "mean": s.mean} for b, s in p.buckets.items()},
        "highest_aesthetic": [{"key": k, "score": v} for v, k, _ in p.top],
        "lowest_aesthetic": [{"key": k, "score": v} for v, k, _ in p.bottom],
        "removed": [{"flags": where, "reason": reason, "samples": n} for where, reason, n in q.removed],
    }
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _quality_html(report_dir: Path, thumbs: Path, q: QualitySection) -> str:
    """Score histograms, aesthetic per bucket, what each threshold removed, the highest and lowest aesthetic."""
    _quality_json(report_dir / "quality.json", q)
    scores = q.partial.scores
    plots = []
    for column, title in ((AESTHETIC, "Aesthetic score (LAION predictor v2, 1-10)"), (NSFW, "NSFW probability")):
        if column in scores:
            _plot_histogram(report_dir / f"quality_{column}.png", title, {column: scores[column]}, column)
            plots.append(f"quality_{column}.png")
    clips = {score_field(c): s for c, s in scores.items() if c.startswith(CLIP)}
    if clips:
        _plot_histogram(report_dir / "quality_clip_scores.png", "CLIP score per caption field", clips, CLIP)
        plots.append("quality_clip_scores.png")
    if q.partial.buckets:
        _plot_bucket_means(report_dir / "quality_aesthetic_buckets.png", q.partial.buckets)
        plots.append("quality_aesthetic_buckets.png")
    low, high, _ = score_range(AESTHETIC)
    out = [
        '<h2 id="quality">Quality</h2>',
        f"<p>From <code>quality/</code>: every sample scored (thresholds and selection do not change the scores). "
        f"Histograms have fixed bins; aesthetic scores beyond {low:g}-{high:g} are counted in the end bins. "
        'Texts over CLIP\'s 77 tokens are scored on their first 77. The numbers: <a href="quality.json">quality.json'
        "</a>.</p>",
        '<table class="quality"><tr><th>score</th><th>scored</th><th>mean</th><th>texts cut at 77 tokens</th></tr>',
    ]
    for column, s in scores.items():
        cut = q.partial.truncated.get(score_field(column)) if column.startswith(CLIP) else None
        mean = "–" if s.mean is None else f"{s.mean:.3f}"
        out.append(
            f"<tr><td>{html.escape(column)}</td><td>{s.count:,}</td><td>{mean}</td>"
            f"<td>{'' if cut is None else f'{cut:,}'}</td></tr>"
        )
    out.append("</table>")
    if q.removed:
        out.append('<table class="quality"><tr><th>keep flags</th><th>reason</th><th>removed</th></tr>')
        out += [
            f"<tr><td>{html.escape(where)}</td><td>{html.escape(reason)}</td><td>{n:,}</td></tr>"
            for where, reason, n in q.removed
        ]
        out.append("</table>")
    if q.partial.buckets:
        out.append('<table class="quality"><tr><th>bucket</th><th>images</th><th>mean aesthetic</th></tr>')
        for key in sorted(q.partial.buckets, key=_bucket_order):
            b = q.partial.buckets[key]
            out.append(f"<tr><td>{html.escape(key)}</td><td>{b.count:,}</td><td>{b.mean:.3f}</td></tr>")
        out.append("</table>")
    out += ['<div class="plots">', *(f'<img class="plot" src="{f}" alt="{f}">' for f in plots), "</div>"]
    out.append(_gallery_html(thumbs, q.top, "quality-top", f"Highest aesthetic ({len(q.top)})", "top-"))
    out.append(_gallery_html(thumbs, q.bottom, "quality-bottom", f"Lowest aesthetic ({len(q.bottom)})", "bottom-"))
    return "\n".join(out)


_CSS = (
    "body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}table.stages td,table.stages th{text-align:left;font-size:13px}"
    "nav a{margin-right:1em}"
    ".plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:1em;align-items:start}"
    ".plots img{width:100%;display:block}.plots img.wide{grid-column:1/-1;width:auto;max-width:100%}"
    ".gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:12px}"
    ".item{font-size:12px;border:1px solid #ddd;padding:6px;overflow-wrap:anywhere}"
    ".item img{max-width:100%;max-height:160px;display:block;margin:auto}"
    ".item p{margin:2px 0;white-space:pre-wrap}.noimage{height:120px;display:flex;align-items:center;"
    "justify-content:center;background:#fbeaea;color:#933}.status-failed{border-color:#d99}"
    ".status-skipped{border-color:#cc9}"
)


def write_report(
    report_dir: Path,
    stats: dict[str, NounStats],
    *,
    valid_threshold: int = VALID_THRESHOLD,
    bucket_counts: dict[str, int] | None = None,
    gallery: list[dict] | None = None,
    stages: Sequence[Any] = (),
    output: str | None = None,
    duplicates: bool = False,
    quality: QualitySection | None = None,
) -> Path:
    """Write Table 1 (md + json), plots and ``index.html`` into ``report_dir``; returns the html path.

    ``stats`` maps a dataset name (e.g. "original", "caption") to its merged counts, in table order.
    ``bucket_counts`` maps an aspect-ratio bucket key ("0.57") to its image count. Gallery items are
    ``{"key", "status", "reason", "bucket", "thumbnail": JPEG bytes or b"", "original", "captions": {set:
    (caption, caption status)}}`` (``curation.stats.overview.sample_gallery``); ``stages`` are
    ``overview.StageCounts``; ``output`` (the output's URL) adds the command that browses it; ``duplicates``: link
    dedup's ``duplicates.html`` (written beside it); ``quality``: the quality section, and a CLIP score column in
    Table 1 (``QualitySection.clip_by_row``: {row name: mean CLIP score of its captions}).
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = [s.table1_row(name, valid_threshold) for name, s in stats.items()]
    if quality is not None:
        rows = [row | {"clip_score": quality.clip_by_row.get(row["name"])} for row in rows]
    _write_table1_md(report_dir / "table1.md", rows, valid_threshold)
    (report_dir / "table1.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")

    plots = {
        "noun_rank_frequency.png": "Noun frequency by rank (log-log)",
        "nouns_per_image.png": "Nouns per image",
    }
    _plot_rank_frequency(report_dir / "noun_rank_frequency.png", stats)
    _plot_nouns_per_image(report_dir / "nouns_per_image.png", stats)
    if bucket_counts is not None:
        _plot_buckets(report_dir / "aspect_buckets.png", bucket_counts)
        plots["aspect_buckets.png"] = "Aspect-ratio buckets"
    _plot_top_nouns(report_dir / "top_nouns.png", stats)
    plots["top_nouns.png"] = f"Top {TOP_NOUNS} nouns"  # last: as wide as the page, one panel per row of Table 1
    thumbs = report_dir / "gallery"
    thumbs.mkdir(exist_ok=True)
    for old in thumbs.glob("*"):  # a smaller gallery than last time leaves no stale thumbnails behind
        old.unlink()

    counts_note = "".join(
        f"<li>{html.escape(name)}: {s.empty:,} empty captions, {s.errors:,} errors</li>" for name, s in stats.items()
    )
    links = [("#stages", "stages")] if stages else []
    links += [("#table1", "Table 1"), ("#plots", "plots")]
    links += [("#quality", "quality")] if quality is not None else []
    links += [("#gallery", f"gallery ({len(gallery)})")] if gallery else []
    if duplicates:
        links.append(("duplicates.html", "duplicate groups"))
    links += [("table1.md", "table1.md"), ("table1.json", "table1.json")]
    browse = (
        f"<p>Every sample, with filters and search: <code>curation browse --output {html.escape(output)}</code></p>"
        if output
        else ""
    )
    body = [
        "<h1>Caption statistics</h1>",
        "<nav>" + "".join(f'<a href="{href}">{html.escape(text)}</a>' for href, text in links) + "</nav>",
        browse,
        _stages_html(stages),
        '<h2 id="table1">Table 1</h2>',
        f"<p>{html.escape(_rule_text(valid_threshold))}</p>",
        f"<p>{html.escape(CLIP_NOTE)}</p>" if quality is not None else "",
        _html_table(rows),
        f"<ul>{counts_note}</ul>",
        "<h2>published in the PixArt-α paper</h2>",
        _html_table(PAPER_ROWS),
        '<h2 id="plots">Plots</h2>',
        '<div class="plots">',
        *(
            f'<img class="plot{" wide" if f == "top_nouns.png" else ""}" src="{f}" alt="{html.escape(alt)}">'
            for f, alt in plots.items()
        ),
        "</div>",
        _quality_html(report_dir, thumbs, quality) if quality is not None else "",
        _gallery_html(thumbs, gallery or [], "gallery", "Gallery"),
    ]
    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Caption statistics</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    index = report_dir / "index.html"
    index.write_text(page, encoding="utf-8")  # last, so a report with an index is complete
    return index
