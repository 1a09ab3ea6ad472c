"""Several processes on one port (``server.workers > 1``): a master (master.py, the I/O shell of
supervisor.py's decisions) that runs no model code, and workers (worker.py), each the single
server. ARCHITECTURE.md, "Processes", has the model."""
