"""Streaming video memory."""
