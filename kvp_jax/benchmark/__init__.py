"""How fast methods are on this machine: timing of compiled calls, the timed methods, peers, runner and report."""
