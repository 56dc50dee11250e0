"""Deployment scripts for Google Compute Engine (see deploy/README.md)."""
