"""Ray job entry points: `ray job submit --working-dir . -- python jobs/<stage>.py ...` (see each docstring)."""
