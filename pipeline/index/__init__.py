"""Index logic without Beam: parameters and candidates, shards and ids, recall, quantizer reuse, the run loader.

The BuildIndex stage (:mod:`pipeline.stages.index`) and the query side both
call it; it imports no stage module and no Beam at import time.
"""
