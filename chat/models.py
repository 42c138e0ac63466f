"""Tenant-schema chat models (bots, conversations, messages) — added with the chat engine."""
