"""Comparing each mirrored response with the primary's (docs/compare.md).

Pure: ``records`` (what a capture is), ``differ`` (what differs), ``noise``
(which differences are real), ``judge`` (a request's verdict per target),
``config``. Shell: ``envoy`` (the capture points in Envoy's configuration),
``capture`` (the observer Envoy streams responses to), ``store`` (SQLite,
the join across processes), ``metrics``, ``report``, ``cli``.
"""
