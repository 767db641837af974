"""Small helpers shared by every stage: user-facing errors (more move here with the architecture redesign)."""
