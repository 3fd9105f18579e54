"""Ray layer: cluster start/join, placement groups, and thin actors around engines and trainer ranks."""
