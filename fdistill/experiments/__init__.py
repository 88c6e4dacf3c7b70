"""Experiments built from fdistill's commands: ``miniature`` is the small-scale test of the
paper's claim (docs/evidence.md, ``make reproduce-mini``)."""
