"""The catalog indexing pipeline.

``pipeline/`` itself holds the options, the configuration, the graph and the
catalog-index command; ``stages/`` the Beam stages; ``index/``, ``query/`` and
``report/`` the Beam-free logic that the stages and the query side share;
``storage.py`` the file helpers all of them use.
"""
