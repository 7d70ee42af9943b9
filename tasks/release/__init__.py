"""Release: evaluate, validate and gate, report, register, ship, guard, promote."""
