"""storelink-agent: the store side of storelink.

Accepts POS events over HTTP (and POSLog files from a drop folder), stores them durably in a
SQLite outbox, and forwards them in order to NATS JetStream, where HQ central consumes them.
"""
