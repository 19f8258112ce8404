"""The gristmill store service: datasets of content-addressed files."""
