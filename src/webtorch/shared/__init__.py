"""State the workers of one server share (issue 22 part 3): the guard's buckets, bans and surge,
the proxy's health marks. ``store.py`` is the interface and its in-process implementation;
``memory.py`` the shared-memory one the master maps for its workers. Standard library only."""
