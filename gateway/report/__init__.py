"""Reports of Service Request outcomes and supplier installation figures, MP169-aware.

`compute` (the report as plain data), `load` (the queries that feed it), `figures` and the
`render_*` modules (text, CSV, JSON, HTML), `cli` (`mp169 report`).
"""
