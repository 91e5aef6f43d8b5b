"""What survives a restart: the SQLite store and the time buckets it keeps."""
