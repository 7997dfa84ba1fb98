"""The run report: statistics (stats), the page (render, charts), its data (data) and the sample (sample).

Beam-free: the publish stage gathers and writes it, ``catalog-index report``
and the tests call it directly.
"""
