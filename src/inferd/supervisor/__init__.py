"""The supervisor: owns backend processes (model manager, watchdog)."""
