"""Image encoders (ViT variants) and the image preprocessing that feeds them."""

from vlmlab.vision.preprocess import ImageProcessor, load_image

__all__ = ["ImageProcessor", "load_image"]
