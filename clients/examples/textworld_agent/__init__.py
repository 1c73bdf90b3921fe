"""TextWorld agent trained through the proxmo service: the end-to-end example (see docs/e2e.md)."""
