"""Segmentation model service: cell detection (Faster R-CNN) + morphometrics over OIP gRPC."""
