"""Data: one loader interface over the DALI, torchvision and synthetic backends."""
