"""What producers call and what the queue carries."""
