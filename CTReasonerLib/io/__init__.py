"""CT input/output with Slicer-compatible geometry."""
