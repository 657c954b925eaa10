"""Task recipes over the Python API: what a command or a route does, as one call each."""
