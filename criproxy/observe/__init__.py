"""Observation, injected from the top: traces, the decision log, and the background log writer
(metrics live in criproxy.metrics). Nothing here decides anything about a call."""
