"""Reports over run directories: curves of one run (plot) and several methods side by side (compare)."""
