"""Decisions on top of the system model: server scheduling (schedule.py)."""
