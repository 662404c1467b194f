"""A run's life: its output file from the first check to the final rename (one publish step), the record loop,
data-parallel parts and their assembly, and the identity ``--resume`` compares."""
