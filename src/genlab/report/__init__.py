"""`genlab report`: runs and sweeps as one self-contained HTML page (see build.py)."""

from genlab.report.build import DEFAULT_MAX_EMBED_MB, write_report

__all__ = ["DEFAULT_MAX_EMBED_MB", "write_report"]
