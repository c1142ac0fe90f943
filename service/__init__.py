"""The HTTP service, the batching generation engine, settings and the command line."""
