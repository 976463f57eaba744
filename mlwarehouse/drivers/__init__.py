"""Client connections shared by an index backend and a blob backend of the same server (MongoDB + GridFS)."""
