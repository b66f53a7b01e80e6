"""labelstudio package."""
