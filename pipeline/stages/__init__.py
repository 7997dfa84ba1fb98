"""The Beam stages of the run and their plain parts, one module per stage.

read (catalog -> validated items), incremental (reuse of the last run's
vectors), embed (the batch stage: fetch, decode_pool, fetch_audio, encode,
transcribe, fuse are its plain parts), write (sharded Parquet), index (the
BuildIndex stage around :mod:`pipeline.index`), publish (accounting, report,
manifest, LATEST), retention; records, faults, progress and stage_metrics are
what they share.
Only :mod:`pipeline.graph` and the command compose them; the index, query and
report packages import none of them.
"""
