"""What a user asks for, as library functions the CLI and Python users call alike: classify, generate, merge,
smoke, inspect, doctor, report (and the prompt path and metrics they share)."""
