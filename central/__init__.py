"""storelink-central: consumes store events from JetStream, sequences them, delivers to the OMS."""
