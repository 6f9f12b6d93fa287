"""gatewayd: the hospital front-end gateway (the lock between the HIS and internet platforms)."""
