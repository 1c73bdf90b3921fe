"""Helpers shared by several test suites (real processes, no mocks)."""
