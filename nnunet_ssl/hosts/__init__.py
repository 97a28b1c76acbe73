"""Hosts decide where the reference prediction comes from (EMA teacher, weak view, second network)."""
