"""What the tool keeps on disk: atomic writes, model folders, output rules and locks, per-image records."""
