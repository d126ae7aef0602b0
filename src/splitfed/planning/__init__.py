"""Decisions on top of the system model: the planners that choose cuts, ranks, subchannels, power,
compression and the server order (registry.PLANNERS, one module each; the schedulers themselves
are in ``splitfed.system.schedule``)."""
