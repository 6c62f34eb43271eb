"""How methods are judged: tasks, scoring, the method registry, the report, its plots, and the runner."""
