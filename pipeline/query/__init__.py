"""The query side, without Beam: query encoding, search, evaluation, metrics, fit-fusion, hits.

It reads a published run through its manifest (:mod:`pipeline.storage`) and
imports no stage module, so a serving process or a notebook can use it alone.
"""
