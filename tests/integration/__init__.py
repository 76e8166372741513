"""Tests against a real tracking server, in a browser, and of the Docker files.

A package, so that its conftest is integration.conftest and never shadows tests/conftest.py.
"""
