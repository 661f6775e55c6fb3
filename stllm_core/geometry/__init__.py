"""Geometry helpers: camera rays (rays.py), poses and frame conventions (poses.py). No ROS here."""
