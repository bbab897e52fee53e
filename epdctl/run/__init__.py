"""Running a plan: start, supervise, record and stop its processes (see docs/design.md)."""
