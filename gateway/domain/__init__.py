"""The lock's decisions, free of any protocol: bookings and the HIS's slot book, prescriptions, quotas, patient
identifier rules, signatures, the audit trail, inbound messages, routes; the ports the gates implement."""
