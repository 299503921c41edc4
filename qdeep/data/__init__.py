"""Data layer: Planet/Kaggle layouts, image folders, decoding, and the bad-input policy."""

from qdeep.data.folders import image_id, scan_images
from qdeep.data.images import IMAGE_EXTENSIONS, BadInputPolicy, ImageDecodeError, load_rgb
from qdeep.data.planet import Dataset, ImageSet, load_class_folders, load_dataset, load_labeled_folder, load_planet

__all__ = ["IMAGE_EXTENSIONS", "BadInputPolicy", "Dataset", "ImageDecodeError", "ImageSet", "image_id",
           "load_class_folders", "load_dataset", "load_labeled_folder", "load_planet", "load_rgb", "scan_images"]
