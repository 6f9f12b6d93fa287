"""Process plumbing: the admin listener, logs, systemd notification, listening sockets and connection limits,
the queue operations, the development CA and the demo."""
