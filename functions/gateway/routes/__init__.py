"""The gateway's routes, one blueprint per concept."""
