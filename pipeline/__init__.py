"""The Beam pipeline: options, the graph, one module per stage, and the catalog-index command."""
