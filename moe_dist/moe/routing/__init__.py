"""Routers (one module per family), their factory, the balance losses and the routing state that
lives across steps."""
