"""Tasks: the repository, the state machine, status fan-out, heartbeat, health and inputs."""
