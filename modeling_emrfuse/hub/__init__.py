"""Publishing a model folder: the model card and the packaging of segmentation + grading models."""
