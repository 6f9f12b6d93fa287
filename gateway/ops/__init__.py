"""Process plumbing: the process's own services (descriptors, chamber open and close, the split lock's watch,
memory trim, hold expiry), reload on SIGHUP, the admin listener, logs, systemd notification, listening sockets
and connection limits, the queue operations, the development CA and the demo."""
