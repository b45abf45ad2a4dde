"""nms package."""
