"""Outcome records: what became of every Service Request, kept durably for reporting.

`schema` (migrations, the stored record, encodings), `tally` (the MP169 counting rule and the count
tables' maths), `recorder` (the buffered background writer the outcome observer calls) and `queries` (the
reads reports make).
"""
