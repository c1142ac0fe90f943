"""One router per concern; shared dependencies in `deps`."""
