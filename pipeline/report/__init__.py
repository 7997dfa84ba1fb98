"""The run report: statistics (stats), the page (render, charts), its data (data) and the sample (sample).

Beam-free: the publish stage gathers and writes it, the command re-renders the
page once the run's timings are known, and tests and notebooks call it directly.
"""
