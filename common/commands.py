"""Subcommand registrations: each adds its arguments and calls one package function."""

from __future__ import annotations
