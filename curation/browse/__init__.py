"""`curation browse`: a local, read-only web app over one output (images beside every caption set, filters, search).

    curation browse --output OUT [--host 127.0.0.1] [--port 8470]

`index.py` queries the output's parquet indexes with DuckDB (a view per stage folder over its done shards; only
the columns and row groups a query needs are read), `thumbs.py` reads one image member of an `images/` tar by the
offset ingest recorded and keeps a bounded cache of thumbnails, `app.py` is the Starlette app and its routes
(`GET /`, `GET /sample/<key>`, `GET /thumb/<key>`), rendered by Jinja2 with autoescaping.
"""
