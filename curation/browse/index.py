"""The output's parquet indexes as DuckDB views, and the grid's queries over them.

One view per stage folder, over the parquet files of its done shards only (a shard without its done marker does
not exist): `images` (every sample, failed ones included: the grid's rows), one per caption set, `dedup`,
`size_filter`, the per-sample noun counts `stats` writes, and `quality` when an output has one (any numeric column
there is a score). A page of the grid is two queries (its count, its 50 rows) that read only the columns their
filters and sort name, then one small query per stage over just the page's shards. Nothing is held per sample:
the server's memory is DuckDB's bounded working memory plus one entry per shard.

User input reaches SQL as bound parameters only; column and view names come from the output's own schema and
from fixed tables here, never from a request.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import duckdb
import fsspec
import fsspec.implementations.local

from curation.errors import SetupError
from curation.layout import ORIGINAL, Layout
from curation.shards import TMP_PREFIX, StageDir

PAGE_SIZE = 50
REFRESH_SECONDS = 5.0  # how often the views look for shards written since (a run may be going on)
_SAFE_COLUMN = re.compile(r"[a-z][a-z0-9_]*")
# What a sample page and a grid card show of each stage's row (the views hold more).
_IMAGE_COLUMNS = (
    "key", "status", "error_reason", "error", "ext", "width", "height", "bucket_256", "bucket_512", "bucket_1024",
    "bucket_2048", "original_caption", "source", "source_id", "member_offset", "member_size",
)  # fmt: skip
_CAPTION_COLUMNS = ("key", "status", "error_reason", "error", "caption", "caption_status")


class QueryError(ValueError):
    """A request the index cannot answer as asked (an invalid regular expression): shown to the user, status 400."""


@dataclass(frozen=True)
class Location:
    """Where one sample's image lies: enough to read its bytes without another query."""

    shard: str
    ext: str
    status: str
    offset: int | None
    size: int | None


@dataclass
class Query:
    """The grid's parameters, already checked (see `from_params`)."""

    stage: str = "images"  # where `status` and `reason` apply: "images" or a caption set
    status: str = ""
    reason: str = ""
    bucket: str = ""
    caption_set: str = ""  # the set shown, searched and sorted by ("" = the default set, or the originals)
    caption_status: str = ""
    q: str = ""
    regex: bool = False
    ranges: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    sort: str = "key"
    desc: bool = False
    page: int = 1


@dataclass
class Page:
    total: int
    rows: list[dict[str, Any]]


class LRU:
    """A small least-recently-used map bounded by a total weight (entries, or bytes for thumbnails)."""

    def __init__(self, capacity: int, weigh=lambda value: 1) -> None:
        self.capacity, self.weigh = capacity, weigh
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._weight = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        w = self.weigh(value)
        if w > self.capacity:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._weight -= self.weigh(old)
            self._items[key] = value
            self._weight += w
            while self._weight > self.capacity:
                _, dropped = self._items.popitem(last=False)
                self._weight -= self.weigh(dropped)

    @property
    def weight(self) -> int:
        return self._weight


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _re2_literal(text: str) -> str:
    """`text` as an RE2 pattern matching itself: every ASCII character but letters and digits as `\\x{..}`."""
    return "".join(c if c.isalnum() or ord(c) > 127 else f"\\x{{{ord(c):02x}}}" for c in text)


class OutputIndex:
    """DuckDB views over one output's indexes, refreshed as shards appear; safe to use from many threads."""

    def __init__(
        self, output: str, *, memory_limit: str = "512MB", threads: int = 2, page_size: int = PAGE_SIZE
    ) -> None:
        fs, path = fsspec.core.url_to_fs(output)
        self.local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
        import os

        self.layout = Layout(os.path.abspath(path) if self.local else output.rstrip("/"))
        if not fs.exists(path):
            raise SetupError(f"the output {output} does not exist")
        self.db = duckdb.connect(
            config={
                "threads": threads,
                "memory_limit": memory_limit,
                # DuckDB's own extensions (httpfs) cannot be fetched offline: remote files go through fsspec.
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
            }
        )
        # Parquet footers cached across queries: each query binds the views over every shard's file.
        for setting in ("parquet_metadata_cache", "enable_object_cache"):  # the name since DuckDB 1.3, and before
            try:
                self.db.execute(f"SET {setting} = true")
                break
            except duckdb.Error:
                continue
        if not self.local:
            self.db.register_filesystem(fs)
        self.page_size = page_size
        self._lock = threading.Lock()
        self._checked = 0.0
        self._files: dict[str, tuple[str, ...]] = {}
        self.views: dict[str, set[str]] = {}  # view -> its columns
        self.shards: dict[str, set[str]] = {}  # view -> its done shards
        self.folders: dict[str, StageDir] = {}  # view -> its folder
        self.sets: list[str] = []  # caption sets, default first
        self.scores: list[str] = []  # numeric columns of `quality`
        self.choices: dict[str, list[str]] = {}  # distinct values offered by the grid's selects
        self.locations = LRU(20_000)  # key -> Location, filled from grid pages (thumbnails ask right after)
        self._marker_cache: dict[tuple[str, str], Any] = {}  # (view, shard) -> its done marker: one per shard
        self.refresh(force=True)
        if "images" not in self.views:
            raise SetupError(self.layout.missing_images())

    # -- views ---------------------------------------------------------------------------------------------------
    def caption_view(self, caption_set: str) -> str:
        return f"cap_{self.sets.index(caption_set)}"

    def nouns_view(self, caption_set: str) -> str:
        """The per-sample noun counts of a set's captions (`original`: of the original captions)."""
        return "nouns_original" if caption_set == ORIGINAL else f"nouns_{self.sets.index(caption_set)}"

    def _folders(self) -> dict[str, StageDir]:
        layout = self.layout
        folders = {"images": layout.images, "dedup": layout.dedup, "size_filter": layout.stage_folder("size-filter")}
        folders["quality"] = layout.stage_folder("quality")
        folders["nouns_original"] = layout.stats_original
        for i, s in enumerate(layout.caption_sets()):
            folders[f"cap_{i}"] = layout.captions(s)
            folders[f"nouns_{i}"] = layout.stats(s)
        return folders

    def refresh(self, force: bool = False) -> None:
        """Rebuild the views whose folder's done shards changed (looked at once per REFRESH_SECONDS)."""
        if not force and time.monotonic() - self._checked < REFRESH_SECONDS:
            return
        with self._lock:
            if not force and time.monotonic() - self._checked < REFRESH_SECONDS:
                return
            sets = self.layout.caption_sets()
            folders = self._folders()
            changed = sets != self.sets
            for view, folder in folders.items():
                files = _done_files(folder)
                if files == self._files.get(view):
                    continue
                changed = True
                self._files[view] = files
                if not files:
                    self.db.execute(f"DROP VIEW IF EXISTS {view}")
                    self.views.pop(view, None)
                    continue
                listing = "[" + ", ".join(_sql_string(folder.url_of(f"{s}.parquet")) for s in files) + "]"
                # Shards written by another version may lack a column (outputs ingested before member offsets):
                # then the files' columns are united by name, which costs every query a look at every footer.
                columns = self.db.execute(
                    f"SELECT count(DISTINCT names) FROM (SELECT list_sort(list(name)) AS names "
                    f"FROM parquet_schema({listing}) GROUP BY file_name)"
                ).fetchone()[0]
                united = ", union_by_name = true" if columns > 1 else ""
                # `filename` is read only for the rows a query returns (the page's 50): it names the shard.
                self.db.execute(
                    f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_parquet({listing}, filename = true{united})"
                )
                self.views[view] = {r[0] for r in self.db.execute(f"DESCRIBE {view}").fetchall()} - {"filename"}
                self.shards[view] = set(files)
                self.folders[view] = folder
            for view in set(self.views) - set(folders):
                self.db.execute(f"DROP VIEW IF EXISTS {view}")
                self.views.pop(view)
            self.sets = sets
            if changed:
                self.scores = [
                    c
                    for c, tp in self._types("quality").items()
                    if c not in ("key", "shard") and _SAFE_COLUMN.fullmatch(c) and _numeric(tp)
                ]
                self.choices = self._choices()
            self._checked = time.monotonic()

    def _types(self, view: str) -> dict[str, str]:
        if view not in self.views:
            return {}
        return {r[0]: r[1] for r in self.db.execute(f"DESCRIBE {view}").fetchall()}

    def _choices(self) -> dict[str, list[str]]:
        """The values the grid's selects offer: statuses and reasons from the done markers' tallies (no scan of the
        rows), buckets from the images index's one small column."""
        tallies: dict[str, set[str]] = {"by_status": set(), "by_reason": set(), "by_skipped": set(),
                                        "by_caption_status": set()}  # fmt: skip
        if "images" not in self.views:
            return {}
        for view in ["images", *(self.caption_view(s) for s in self.sets)]:
            for marker in self._markers(view) if view in self.views else ():
                for name, seen in tallies.items():
                    seen.update(k for k, v in marker.counts.get(name, {}).items() if v)
        buckets = [
            r[0]
            for r in self.db.execute("SELECT DISTINCT bucket_1024 FROM images WHERE bucket_1024 IS NOT NULL").fetchall()
        ]
        return {
            "status": sorted(tallies["by_status"]),
            "reason": sorted(tallies["by_reason"] | tallies["by_skipped"]),
            "bucket": sorted(map(str, buckets), key=_bucket_key),
            "caption_status": sorted(tallies["by_caption_status"]),
        }

    def _markers(self, view: str) -> list:
        """The done markers of a view's shards, each read once."""
        folder, shards = self.folders[view], sorted(self.shards[view])
        missing = [s for s in shards if (view, s) not in self._marker_cache]
        for shard, marker in folder.read_dones(missing).items():
            self._marker_cache[(view, shard)] = marker
        return [self._marker_cache[(view, s)] for s in shards]

    # -- the grid ------------------------------------------------------------------------------------------------
    def numeric_columns(self, caption_set: str) -> dict[str, tuple[str, str]]:
        """{name: (view alias, SQL expression)} of the columns a range filter or a sort may use."""
        out = {"width": ("i", "i.width"), "height": ("i", "i.height")}
        if "dedup" in self.views:
            out["group_size"] = ("d", "d.group_size")
        if caption_set == ORIGINAL:
            out["caption_length"] = ("i", "length(i.original_caption)")
        elif caption_set in self.sets:
            out["caption_length"] = ("c", "length(c.caption)")
        if (caption_set == ORIGINAL or caption_set in self.sets) and "nouns" in self.views.get(
            self.nouns_view(caption_set), ()
        ):
            out["nouns"] = ("n", "n.nouns")
        for score in self.scores:
            out.setdefault(score, ("q", f"q.{_ident(score)}"))
        return out

    def default_set(self) -> str:
        return self.sets[0] if self.sets else ORIGINAL

    def from_params(self, params: dict[str, str]) -> Query:
        """A `Query` from the request's parameters; unknown values fall back to the defaults."""
        self.refresh()

        def pick(name: str, allowed: list[str], default: str = "") -> str:
            value = params.get(name, "")
            return value if value in allowed else default

        caption_set = pick("set", [ORIGINAL, *self.sets], self.default_set())
        numeric = self.numeric_columns(caption_set)
        ranges = {}
        for name in numeric:
            lo, hi = _number(params.get(f"min_{name}")), _number(params.get(f"max_{name}"))
            if lo is not None or hi is not None:
                ranges[name] = (lo, hi)
        return Query(
            stage=pick("stage", ["images", *self.sets], "images"),
            status=params.get("status", "")[:64],
            reason=params.get("reason", "")[:64],
            bucket=params.get("bucket", "")[:16],
            caption_set=caption_set,
            caption_status=params.get("caption_status", "")[:32],
            q=params.get("q", "")[:500],
            regex=params.get("mode") == "regex",
            ranges=ranges,
            sort=pick("sort", ["key", *numeric], "key"),
            desc=params.get("order") == "desc",
            page=max(1, int(_number(params.get("page")) or 1)),
        )

    def _plan(self, query: Query) -> tuple[str, str, list[Any], str, str]:
        """FROM ... WHERE ... of the query's count and of its page, their parameters, the ORDER BY expression and
        the alias of the page's base (whose `key` and `filename` name the page's samples).

        The images index is the base (every sample); another stage's view is joined only when a filter or the sort
        reads it, so the plain grid reads the images index's key column and nothing else.
        """
        where: list[str] = []
        params: list[Any] = []
        used: set[str] = set()
        text_set = query.caption_set
        if query.status or query.reason:
            alias = "i"
            if query.stage != "images":
                alias = "c" if query.stage == query.caption_set else "s"
            used.add(alias)
            if query.status:
                where.append(f"{alias}.status = ?")
                params.append(query.status)
            if query.reason:
                where.append(f"{alias}.error_reason = ?")
                params.append(query.reason)
        if query.bucket:
            used.add("i")
            where.append("i.bucket_1024 = ?")
            params.append(query.bucket)
        if query.caption_status and text_set in self.sets:
            used.add("c")
            where.append("c.caption_status = ?")
            params.append(query.caption_status)
        if query.q:
            column = "i.original_caption" if text_set == ORIGINAL else "c.caption"
            used.add(column[0])
            # A phrase is a case-insensitive RE2 literal: here about twice as fast as ILIKE over a caption column.
            where.append(f"regexp_matches({column}, ?)")
            params.append(query.q if query.regex else "(?i)" + _re2_literal(query.q))
        numeric = self.numeric_columns(query.caption_set)
        for name, (lo, hi) in query.ranges.items():
            alias, expr = numeric[name]
            used.add(alias)
            if lo is not None:
                where.append(f"{expr} >= ?")
                params.append(lo)
            if hi is not None:
                where.append(f"{expr} <= ?")
                params.append(hi)
        filtered = set(used)  # what the count needs: a join only the sort reads cannot change it
        sort = numeric[query.sort] if query.sort != "key" else None
        if sort is not None:
            used.add(sort[0])
        views = self._alias_views(query)
        condition = " WHERE " + " AND ".join(where) if where else ""

        def source(aliases: set[str]) -> tuple[str, str]:
            """(the base's alias, FROM ... WHERE ...). Filters that read one other stage's view alone are run on that
            view, not on a join with every sample's images row: a sample missing from it cannot pass them."""
            if where and len(aliases) == 1 and "i" not in aliases:
                (alias,) = aliases
                return alias, f"FROM {views[alias]} {alias}{condition}"
            joins = "".join(f" LEFT JOIN {views[a]} {a} ON {a}.key = i.key" for a in sorted(aliases) if a != "i")
            return "i", f"FROM images i{joins}{condition}"

        (_, counted), (base, sql) = source(filtered), source(used)
        key = f"{base}.key"
        order = f"{key} DESC" if query.desc else key
        if sort is not None:
            order = f"{sort[1]} {'DESC' if query.desc else 'ASC'} NULLS LAST, {key}"
        return counted, sql, params, order, base

    def _alias_views(self, query: Query) -> dict[str, str]:
        """The view each alias of `_plan` joins."""
        views = {"d": "dedup", "q": "quality"}
        if query.caption_set in self.sets:
            views["c"] = self.caption_view(query.caption_set)
        if query.stage in self.sets:
            views["s"] = self.caption_view(query.stage)
        if query.caption_set == ORIGINAL or query.caption_set in self.sets:
            views["n"] = self.nouns_view(query.caption_set)
        return views

    def page(self, query: Query) -> Page:
        """The count of matching samples and the rows of the requested page (with the shown set's captions)."""
        counted, sql, params, order, base = self._plan(query)
        offset = (query.page - 1) * self.page_size
        cursor = self.db.cursor()
        try:
            total = cursor.execute(f"SELECT count(*) {counted}", params).fetchone()[0]
            keys = self._sorted_elsewhere(cursor, query, offset) if not params else None
            if keys is None:
                # Only the key and its file go through the sort; the page's other columns are read afterwards from
                # its shards alone.
                cursor.execute(
                    f"SELECT {base}.key, {base}.filename {sql} ORDER BY {order} LIMIT {self.page_size} OFFSET {offset}",
                    params,
                )
                keys = [_with_shard({"key": k, "filename": f}) for k, f in cursor.fetchall()]
        except duckdb.InvalidInputException as exc:
            raise QueryError(f"the search cannot run: {str(exc).splitlines()[0]}") from None
        finally:
            cursor.close()
        found = self.rows_in_shards("images", keys, _IMAGE_COLUMNS)
        blank = dict.fromkeys(_IMAGE_COLUMNS)  # columns an older output's shards lack
        rows = [blank | found[k["key"]] | {"shard": k["shard"]} for k in keys if k["key"] in found]
        for r in rows:
            self.locations.put(r["key"], _location(r))
        if query.caption_set in self.sets:
            found = self.rows_in_shards(self.caption_view(query.caption_set), rows, _CAPTION_COLUMNS)
            for r in rows:
                c = found.get(r["key"], {})
                r.update(caption=c.get("caption"), caption_status=c.get("caption_status"), set_status=c.get("status"))
        return Page(total, rows)

    def _sorted_elsewhere(self, cursor: Any, query: Query, offset: int) -> list[dict[str, Any]] | None:
        """The page's keys (and shards) of an unfiltered grid sorted by another stage's column, from that stage's
        view alone (no join of every sample); None where that view cannot answer: the sort is by an images column,
        or the page reaches the samples the view has no value for (they come last)."""
        if query.sort == "key":
            return None
        alias, expr = self.numeric_columns(query.caption_set)[query.sort]
        view = self._alias_views(query).get(alias)
        if alias == "i" or view not in self.views:
            return None
        if cursor.execute(f"SELECT count({expr}) FROM {view} {alias}").fetchone()[0] < offset + self.page_size:
            return None
        cursor.execute(
            f"SELECT {alias}.key, {alias}.filename FROM {view} {alias} "
            f"ORDER BY {expr} {'DESC' if query.desc else 'ASC'}, {alias}.key LIMIT {self.page_size} OFFSET {offset}"
        )
        return [_with_shard({"key": k, "filename": f}) for k, f in cursor.fetchall()]

    def rows_in_shards(self, view: str, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> dict[str, dict]:
        """{key: row} of `view` for the given (key, shard) rows, reading only those shards' files."""
        shards = sorted({r["shard"] for r in rows} & self.shards.get(view, set()))
        if not shards:
            return {}
        folder = self.folders[view]
        listing = "[" + ", ".join(_sql_string(folder.url_of(f"{s}.parquet")) for s in shards) + "]"
        picked = ", ".join(c for c in columns if c in self.views[view])
        keys = [r["key"] for r in rows]
        cursor = self.db.cursor()
        try:
            cursor.execute(
                f"SELECT {picked} FROM read_parquet({listing}, union_by_name = true) WHERE list_contains(?, key)",
                [keys],
            )
            names = [d[0] for d in cursor.description]
            return {r[0]: dict(zip(names, r, strict=True)) for r in cursor.fetchall()}
        finally:
            cursor.close()

    # -- one sample ----------------------------------------------------------------------------------------------
    def locate(self, key: str) -> Location | None:
        """Where a key's image lies, or None when the key is not in the images index."""
        found = self.locations.get(key)
        if found is None:
            row = self.row("images", key)
            if row is None:
                return None
            found = _location(row)
            self.locations.put(key, found)
        return found

    def row(self, view: str, key: str, shard: str | None = None) -> dict[str, Any] | None:
        """One key's row of a view; with `shard`, reading only that shard's file."""
        if view not in self.views:
            return None
        self.refresh()
        source = view
        if shard is not None:
            if shard not in self.shards.get(view, ()):
                return None
            source = f"read_parquet({_sql_string(self.folders[view].url_of(f'{shard}.parquet'))})"
        cursor = self.db.cursor()
        try:
            cursor.execute(f"SELECT * FROM {source} WHERE key = ? LIMIT 1", [key])
            names = [d[0] for d in cursor.description]
            found = cursor.fetchone()
        finally:
            cursor.close()
        return None if found is None else _with_shard(dict(zip(names, found, strict=True)))

    def group_members(self, group: str, limit: int = 60) -> list[dict[str, Any]]:
        """The members of a dedup group (the kept one first, then by distance)."""
        if "dedup" not in self.views:
            return []
        cursor = self.db.cursor()
        try:
            cursor.execute(
                'SELECT key, keep, distance, exact FROM dedup WHERE "group" = ? ORDER BY keep DESC, distance, key '
                f"LIMIT {limit}",
                [group],
            )
            return [dict(zip(("key", "keep", "distance", "exact"), r, strict=True)) for r in cursor.fetchall()]
        finally:
            cursor.close()


def _with_shard(row: dict[str, Any]) -> dict[str, Any]:
    """The row with `shard` in place of the view's `filename` (`.../NNNNN.parquet`)."""
    if "filename" in row:
        row["shard"] = row.pop("filename").rsplit("/", 1)[-1].removesuffix(".parquet")
    return row


def _location(row: dict[str, Any]) -> Location:
    return Location(row["shard"], row["ext"], row["status"], row.get("member_offset"), row.get("member_size"))


def _done_files(folder: StageDir) -> tuple[str, ...]:
    """The done shards of a folder that have a parquet index, sorted."""
    fs = folder.fs
    fs.invalidate_cache(folder.root)
    if not fs.exists(folder.root):
        return ()
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder.root, detail=False)}
    done = (n.removesuffix(".done.json") for n in names if n.endswith(".done.json") and not n.startswith(TMP_PREFIX))
    return tuple(sorted(s for s in done if f"{s}.parquet" in names))


def _numeric(duck_type: str) -> bool:
    return duck_type.split("(")[0] in {
        "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT",
        "FLOAT", "DOUBLE", "DECIMAL",
    }  # fmt: skip


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is None or value == value and abs(value) != float("inf") else None


def _bucket_key(bucket: str) -> tuple[int, float]:
    try:
        return (0, float(bucket))
    except ValueError:
        return (1, 0.0)
