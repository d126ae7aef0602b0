"""Decisions on top of the system model: server scheduling (schedule.py) and the planners that
choose cuts, ranks, subchannels, power and compression (registry.PLANNERS, one module each)."""
