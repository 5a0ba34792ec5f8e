"""The append-only audit log of every human and administrative action."""
