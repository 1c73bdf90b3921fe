"""proxmo client."""
